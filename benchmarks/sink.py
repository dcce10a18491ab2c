"""A lean stand-in for Langfuse (and Sentry): answers every request 200, keeps counts.

The benchmark's exporters need a server that accepts what they send and costs as
little CPU as possible, because it shares the machine with the process being
measured. This one parses just enough HTTP/1.1 (request line, headers, a body by
Content-Length or chunked) to keep connections alive, and counts requests and bytes
per path. ``GET /__stats`` returns the counts as JSON; ``POST /__reset`` zeroes them.

Run: ``python benchmarks/sink.py PORT`` (prints ``ready`` when listening).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

_requests: Counter[str] = Counter()
_bytes: Counter[str] = Counter()


def _response(status: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        size = 0
        while True:
            line = await reader.readline()
            chunk = int(line.split(b";")[0].strip() or b"0", 16)
            if chunk == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return size
            await reader.readexactly(chunk + 2)
            size += chunk
    length = int(headers.get("content-length", "0") or 0)
    if length:
        await reader.readexactly(length)
    return length


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            request_line = await reader.readline()
            if not request_line:
                return
            method, path, _ = request_line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            size = await _read_body(reader, headers)
            path = path.split("?", 1)[0]
            if path == "/__stats":
                body = json.dumps({"requests": _requests, "bytes": _bytes}).encode()
                writer.write(_response("200 OK", body))
            elif path == "/__reset":
                _requests.clear()
                _bytes.clear()
                writer.write(_response("200 OK", b"{}"))
            else:
                _requests[path] += 1
                _bytes[path] += size
                # An empty protobuf message is zero bytes: valid for the OTLP exporters.
                writer.write(_response("200 OK", b"" if method == "POST" else b"{}"))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, backlog=256)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
