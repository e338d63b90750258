from protos import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardFile(_message.Message):
    __slots__ = ("name", "sha256", "size", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size: int
    tensor: str
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., tensor: _Optional[str] = ...) -> None: ...

class ShardFiles(_message.Message):
    __slots__ = ("model_id", "files", "layer_start", "layer_end")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    files: _containers.RepeatedCompositeFieldContainer[ShardFile]
    layer_start: int
    layer_end: int
    def __init__(self, model_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ShardFile, _Mapping]]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class FileNeed(_message.Message):
    __slots__ = ("sha256", "size", "held")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    held: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., held: _Optional[int] = ...) -> None: ...

class FileNeeds(_message.Message):
    __slots__ = ("needs", "local", "free_bytes")
    NEEDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    needs: _containers.RepeatedCompositeFieldContainer[FileNeed]
    local: bool
    free_bytes: int
    def __init__(self, needs: _Optional[_Iterable[_Union[FileNeed, _Mapping]]] = ..., local: _Optional[bool] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("sha256", "size", "offset", "data", "chunk_sha256")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    offset: int
    data: bytes
    chunk_sha256: str
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., chunk_sha256: _Optional[str] = ...) -> None: ...

class ChunkAck(_message.Message):
    __slots__ = ("sha256", "offset", "ok", "complete", "held", "error")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    ok: bool
    complete: bool
    held: int
    error: str
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., ok: _Optional[bool] = ..., complete: _Optional[bool] = ..., held: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("plan_id", "loop")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    loop: bool
    def __init__(self, plan_id: _Optional[str] = ..., loop: _Optional[bool] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("challenge",)
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    def __init__(self, challenge: _Optional[bytes] = ...) -> None: ...

class ShardSpec(_message.Message):
    __slots__ = ("model_id", "model_path", "layer_start", "layer_end", "num_layers", "stage_index", "num_stages", "next_address", "max_message_bytes", "plan_id", "files", "last_address")
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
    FILES_FIELD_NUMBER: _ClassVar[int]
    LAST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
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
    files: _containers.RepeatedCompositeFieldContainer[ShardFile]
    last_address: str
    def __init__(self, model_id: _Optional[str] = ..., model_path: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., stage_index: _Optional[int] = ..., num_stages: _Optional[int] = ..., next_address: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., plan_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ShardFile, _Mapping]]] = ..., last_address: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("id", "name", "version", "api", "memory_bytes", "bandwidth_gbps", "chip", "backend", "cluster", "metrics_port", "shard", "sessions", "proof", "kv_bytes", "stopping", "device", "lanes")
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
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
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
    stopping: bool
    device: str
    lanes: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., api: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., bandwidth_gbps: _Optional[float] = ..., chip: _Optional[str] = ..., backend: _Optional[str] = ..., cluster: _Optional[str] = ..., metrics_port: _Optional[int] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., sessions: _Optional[int] = ..., proof: _Optional[bytes] = ..., kv_bytes: _Optional[int] = ..., stopping: _Optional[bool] = ..., device: _Optional[str] = ..., lanes: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("spec", "keep_serving")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    KEEP_SERVING_FIELD_NUMBER: _ClassVar[int]
    spec: ShardSpec
    keep_serving: bool
    def __init__(self, spec: _Optional[_Union[ShardSpec, _Mapping]] = ..., keep_serving: _Optional[bool] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("phase", "fraction", "shard", "layers_kept")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    LAYERS_KEPT_FIELD_NUMBER: _ClassVar[int]
    phase: str
    fraction: float
    shard: ShardInfo
    layers_kept: int
    def __init__(self, phase: _Optional[str] = ..., fraction: _Optional[float] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., layers_kept: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("seq_id", "token_ids", "hidden", "start", "sample", "sampling", "offset", "fork_from", "fork_length", "draft", "grammar", "output_offset")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FORK_FROM_FIELD_NUMBER: _ClassVar[int]
    FORK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    start: bool
    sample: bool
    sampling: _inference_pb2.SamplingParams
    offset: int
    fork_from: str
    fork_length: int
    draft: int
    grammar: str
    output_offset: int
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., start: _Optional[bool] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., offset: _Optional[int] = ..., fork_from: _Optional[str] = ..., fork_length: _Optional[int] = ..., draft: _Optional[int] = ..., grammar: _Optional[str] = ..., output_offset: _Optional[int] = ...) -> None: ...

class StageMessage(_message.Message):
    __slots__ = ("step_id", "seqs", "release", "error", "next_step_id", "ahead", "dropped")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    seqs: _containers.RepeatedCompositeFieldContainer[SeqInput]
    release: _containers.RepeatedScalarFieldContainer[str]
    error: str
    next_step_id: int
    ahead: bool
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step_id: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[SeqInput, _Mapping]]] = ..., release: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., next_step_id: _Optional[int] = ..., ahead: _Optional[bool] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SeqOutput(_message.Message):
    __slots__ = ("seq_id", "token", "logprob", "top_tokens", "top_logprobs", "accepted")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token: int
    logprob: float
    top_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    accepted: _containers.RepeatedCompositeFieldContainer[SeqOutput]
    def __init__(self, seq_id: _Optional[str] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., accepted: _Optional[_Iterable[_Union[SeqOutput, _Mapping]]] = ...) -> None: ...

class StageResult(_message.Message):
    __slots__ = ("step_id", "outputs", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    outputs: _containers.RepeatedCompositeFieldContainer[SeqOutput]
    error: str
    def __init__(self, step_id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[SeqOutput, _Mapping]]] = ..., error: _Optional[str] = ...) -> None: ...
