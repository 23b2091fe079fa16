"""A local HTTP server that answers every request after a fixed delay: the network wait of the
benchmarks' un-annotated I/O workloads (a task that calls ``urllib.request.urlopen`` as most task
code calls ``requests`` or a database driver, without ``cmwq_exec.blocking()``).

    python benchmarks/slow_http.py [--delay-ms 10] [--port 0]

It prints ``port N`` once it listens on 127.0.0.1 (port 0: a free one), then serves until it is
terminated. One asyncio loop serves every connection, so thousands of requests can wait at once
for the cost of a few hundred microseconds of CPU each; each answer is ``200 ok`` with
``Connection: close``, as ``urlopen`` asks.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def serve(delay: float, port: int) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")  # the request line and headers (a GET has no body)
            await asyncio.sleep(delay)
            writer.write(ANSWER)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port, backlog=4096)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=10.0,
                        help="the wait before each answer (default 10)")
    parser.add_argument("--port", type=int, default=0, help="the port on 127.0.0.1 (default 0: a free one)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error(f"--delay-ms must be at least 0, got {args.delay_ms}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")
    try:
        asyncio.run(serve(args.delay_ms / 1000, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
