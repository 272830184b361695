"""Multipart form fields decoded strictly.

Starlette decodes a form field that is not valid text in the request's charset (UTF-8 unless
the request names another) as Latin-1 instead, so a prompt sent in a legacy encoding was stored
as mojibake. Routes with form fields use `StrictFormRoute`: such a field answers 422 naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Receive


class _StrictParser(MultiPartParser):
    """Notes each text field that does not decode in the request's charset."""

    def __init__(self, headers: Headers, stream: Any, **limits: Any) -> None:
        super().__init__(headers, stream, **limits)
        self.undecodable: list[str] = []

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                part.data.decode(self._charset)
            except (UnicodeDecodeError, LookupError):
                self.undecodable.append(part.field_name)
        super().on_part_end()

    @property
    def charset(self) -> str:
        return self._charset


class _StrictFormRequest(Request):
    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = _StrictParser(
                        self.headers,
                        stream,
                        max_files=max_files,
                        max_fields=max_fields,
                        max_part_size=max_part_size,
                    )
                    form = await parser.parse()
            except MultiPartException as exc:
                raise HTTPException(status_code=400, detail=exc.message) from None
            if parser.undecodable:
                await form.close()
                raise HTTPException(
                    status_code=422,
                    detail=[
                        {
                            "type": "string_unicode",
                            "loc": ["body", name],
                            "msg": f"form field {name!r} is not valid {parser.charset} text; "
                            f"send it encoded as {parser.charset}",
                        }
                        for name in parser.undecodable
                    ],
                )
            self._form = form
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


class StrictFormRoute(APIRoute):
    """An APIRoute whose form fields must be valid text in the request's charset."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            receive: Receive = request.receive
            return await handler(_StrictFormRequest(request.scope, receive))

        return strict
