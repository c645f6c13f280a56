"""A TCP proxy the tests control, to cut a daemon off from its database and bring it back."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from worker.config import DatabaseURL


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `cut()` drops every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self._break_on: bytes | None = None
        self._answer_dropped_for: asyncio.StreamWriter | None = None

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def database_url(self, url: DatabaseURL) -> str:
        """`url` as seen through this proxy (WORKER_DATABASE_URL for a daemon subprocess)."""
        auth = f"{url.user}:{url.password}" if url.password else url.user
        return f"mysql://{auth}@127.0.0.1:{self.port}/{url.database}"

    def cut(self) -> None:
        self._call(self._close())

    def break_on(self, marker: bytes) -> None:
        """The next time a client sends `marker` (e.g. a COMMIT), forward it to the server,
        drop the server's answer and cut that client off: the statement ran, the client
        never hears so (an OK lost on the way back)."""
        self._break_on = marker

    def restore(self) -> None:
        self._call(self._listen())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:  # cut while connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer, client=writer), self._pipe(up_reader, writer))

    def _drops_answer(self, writer: asyncio.StreamWriter) -> bool:
        """Whether `writer`'s client is the one whose next answer goes nowhere; it is cut off."""
        if self._answer_dropped_for is not writer:
            return False
        self._answer_dropped_for = None
        writer.transport.abort()
        return True

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter | None = None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if client is None and self._drops_answer(writer):
                    break
                writer.write(data)
                await writer.drain()
                if client is not None and self._break_on is not None and self._break_on in data:
                    # The server runs it; its answer (the OK) is dropped and the client cut off
                    # only once that answer exists, so the statement has surely finished.
                    self._break_on = None
                    self._answer_dropped_for = client
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
