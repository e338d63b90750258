"""A request message that does not parse ends its call with INVALID_ARGUMENT, not UNKNOWN."""

from __future__ import annotations

import inspect
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    """What a request that does not parse becomes, so its handler can refuse it."""

    def __init__(self, error: DecodeError) -> None:
        self.message = (f"the request does not parse: {error} (protobuf strings must be valid "
                        "UTF-8)")


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Unary-request calls whose message does not parse (a string field that is not UTF-8,
    bytes that are not protobuf) end with INVALID_ARGUMENT, not grpc's UNKNOWN for a failing
    deserializer. Streaming requests meet the DecodeError in their handler, which ends the
    call the same way (worker/server.py: Forward, Put)."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as e:
                return _Undecodable(e)

        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)

        async def refuse(request: Any, context: Any) -> None:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

        if inspect.isasyncgenfunction(behavior):
            async def checked(request: Any, context: Any) -> Any:
                await refuse(request, context)
                async for msg in behavior(request, context):
                    yield msg
        else:  # a coroutine (unary, or streaming through context.write)
            async def checked(request: Any, context: Any) -> Any:
                await refuse(request, context)
                return await behavior(request, context)

        return handler._replace(request_deserializer=deserialize, **{kind: checked})


async def parsed(requests: Any, context: Any) -> Any:
    """The messages of a request stream; one that does not parse ends the call with
    INVALID_ARGUMENT."""
    try:
        async for msg in requests:
            yield msg
    except DecodeError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a message does not parse: {e}")
