"""A test EHR: an MLLP receiver on 127.0.0.1 (own thread and event loop) that records every message and
answers AA, or AE with an ERR text for the messages a test chooses.

    with EhrReceiver() as ehr:           # ehr.port
        ehr.reject = lambda msg: msg.trigger == "S13"   # AE (once per call of reject returning True)
        ...
        ehr.messages                      # parsed engine.hl7.Message objects, in arrival order
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType

from engine import hl7, mllp

AE_TEXT = "Slot not available in the EHR schedule"


class EhrReceiver:
    def __init__(self) -> None:
        self.messages: list[hl7.Message] = []
        self.rejected: list[hl7.Message] = []
        self.reject: Callable[[hl7.Message], bool] = lambda msg: False
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._lock = threading.Lock()

    def _ack(self, msg: hl7.Message) -> bytes:
        reject = self.reject(msg)
        code = "AE" if reject else "AA"
        with self._lock:
            (self.rejected if reject else self.messages).append(msg)
        segs = [
            f"MSH|^~\\&|EHR|EHR|{msg.sending_application}|{msg.sending_facility}|20261204120000||ACK^{msg.trigger}^ACK|"
            f"A{msg.control_id}|P|2.5.1",
            f"MSA|{code}|{msg.control_id}" + (f"|{AE_TEXT}" if reject else ""),
        ]
        if reject:
            segs.append(f"ERR|||207^Application internal error^HL70357|E||||{AE_TEXT}")
        return ("\r".join(segs) + "\r").encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = mllp.Framer()
        try:
            while True:
                data = await reader.read(65536)
                framer.receive_data(data)
                while True:
                    ev = framer.next_event()
                    if ev is mllp.NEED_DATA:
                        break
                    if isinstance(ev, mllp.Frame):
                        writer.write(mllp.encode(self._ack(hl7.parse_bytes(ev.payload))))
                        await writer.drain()
                    elif isinstance(ev, mllp.Closed):
                        writer.close()
                        return
                if not data:
                    writer.close()
                    return
        except ConnectionError:
            return

    def start(self) -> EhrReceiver:
        self._thread.start()

        async def serve() -> int:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def received(self) -> list[hl7.Message]:
        with self._lock:
            return list(self.messages)

    def __enter__(self) -> EhrReceiver:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
