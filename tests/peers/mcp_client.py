"""A third-party MCP client for tests/mcp_interop.rs: the official Python SDK (PyPI `mcp`,
pinned in requirements.txt) connects to a switchboard tenant endpoint over Streamable HTTP
with a bearer credential, lists the tools, calls `echo`, and prints one JSON object.

usage: mcp_client.py URL TOKEN [TEXT]
Exits 0 on success, 1 on any failure (printed as {"error": ..., "statuses": [...]}, with
the HTTP status of every response the client got, so that a test can tell a refusal from
a crash).
"""

import asyncio
import json
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


STATUSES: list[int] = []


async def record_status(response: httpx2.Response) -> None:
    STATUSES.append(response.status_code)


async def run(url: str, token: str, text: str) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    hooks = {"response": [record_status]}
    async with httpx2.AsyncClient(headers=headers, timeout=30.0, event_hooks=hooks) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                tools = await session.list_tools()
                result = await session.call_tool("echo", {"text": text})
                return {
                    "protocolVersion": str(init.protocol_version),
                    "serverName": init.server_info.name,
                    "tools": sorted(t.name for t in tools.tools),
                    "call": result.model_dump(mode="json", by_alias=True, exclude_none=True),
                }


def describe(err: BaseException) -> str:
    """The leaf errors of an exception (group), e.g. the HTTP status of a refusal."""
    if isinstance(err, BaseExceptionGroup):
        return "; ".join(describe(e) for e in err.exceptions)
    detail = getattr(err, "error", None)
    return f"{type(err).__name__}: {err}" + (f" ({detail})" if detail is not None else "")


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: mcp_client.py URL TOKEN [TEXT]", file=sys.stderr)
        return 2
    text = sys.argv[3] if len(sys.argv) > 3 else "hello from python"
    try:
        out = asyncio.run(asyncio.wait_for(run(sys.argv[1], sys.argv[2], text), 60))
    except BaseException as err:  # noqa: BLE001 - report every failure, including groups
        print(json.dumps({"error": describe(err), "statuses": STATUSES}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
