from protos import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResultsRequest(_message.Message):
    __slots__ = ("plan_id",)
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    def __init__(self, plan_id: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("challenge",)
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    def __init__(self, challenge: _Optional[bytes] = ...) -> None: ...

class ShardSpec(_message.Message):
    __slots__ = ("model_id", "model_path", "layer_start", "layer_end", "num_layers", "stage_index", "num_stages", "next_address", "max_message_bytes", "plan_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_path: str
    layer_start: int
    layer_end: int
    num_layers: int
    stage_index: int
    num_stages: int
    next_address: str
    max_message_bytes: int
    plan_id: str
    def __init__(self, model_id: _Optional[str] = ..., model_path: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., stage_index: _Optional[int] = ..., num_stages: _Optional[int] = ..., next_address: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., plan_id: _Optional[str] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("spec", "model_type", "weight_bytes", "active_memory_bytes", "load_seconds", "forkable")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORKABLE_FIELD_NUMBER: _ClassVar[int]
    spec: ShardSpec
    model_type: str
    weight_bytes: int
    active_memory_bytes: int
    load_seconds: float
    forkable: bool
    def __init__(self, spec: _Optional[_Union[ShardSpec, _Mapping]] = ..., model_type: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., active_memory_bytes: _Optional[int] = ..., load_seconds: _Optional[float] = ..., forkable: _Optional[bool] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("id", "name", "version", "api", "memory_bytes", "bandwidth_gbps", "chip", "backend", "cluster", "metrics_port", "shard", "sessions", "proof", "kv_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    version: str
    api: int
    memory_bytes: int
    bandwidth_gbps: float
    chip: str
    backend: str
    cluster: str
    metrics_port: int
    shard: ShardInfo
    sessions: int
    proof: bytes
    kv_bytes: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., api: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., bandwidth_gbps: _Optional[float] = ..., chip: _Optional[str] = ..., backend: _Optional[str] = ..., cluster: _Optional[str] = ..., metrics_port: _Optional[int] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., sessions: _Optional[int] = ..., proof: _Optional[bytes] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ShardSpec
    def __init__(self, spec: _Optional[_Union[ShardSpec, _Mapping]] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("phase", "fraction", "shard")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    phase: str
    fraction: float
    shard: ShardInfo
    def __init__(self, phase: _Optional[str] = ..., fraction: _Optional[float] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class SeqInput(_message.Message):
    __slots__ = ("seq_id", "token_ids", "hidden", "start", "sample", "sampling", "offset", "fork_from", "fork_length")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FORK_FROM_FIELD_NUMBER: _ClassVar[int]
    FORK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    start: bool
    sample: bool
    sampling: _inference_pb2.SamplingParams
    offset: int
    fork_from: str
    fork_length: int
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., start: _Optional[bool] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., offset: _Optional[int] = ..., fork_from: _Optional[str] = ..., fork_length: _Optional[int] = ...) -> None: ...

class StageMessage(_message.Message):
    __slots__ = ("step_id", "seqs", "release", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    seqs: _containers.RepeatedCompositeFieldContainer[SeqInput]
    release: _containers.RepeatedScalarFieldContainer[str]
    error: str
    def __init__(self, step_id: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[SeqInput, _Mapping]]] = ..., release: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ...) -> None: ...

class SeqOutput(_message.Message):
    __slots__ = ("seq_id", "token", "logprob", "top_tokens", "top_logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token: int
    logprob: float
    top_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, seq_id: _Optional[str] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class StageResult(_message.Message):
    __slots__ = ("step_id", "outputs", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    outputs: _containers.RepeatedCompositeFieldContainer[SeqOutput]
    error: str
    def __init__(self, step_id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[SeqOutput, _Mapping]]] = ..., error: _Optional[str] = ...) -> None: ...
