#!/usr/bin/env python3
"""The second baseline for `cargo bench --bench relay`: one asyncio process
reading every stream (the `websockets` library), `json.loads` per message
and a count per user and type in a dict; it stores nothing. The cheapest a
Python reader of these streams gets: what a rewrite in Python would start
from.

Usage: relay_asyncio.py BASE_URL DATA_DIR STREAM...
Writes the number of messages counted to DATA_DIR/count every 100 ms.
"""
import asyncio
import json
import os
import sys

import websockets

BASE, DATA_DIR, STREAMS = sys.argv[1], sys.argv[2], sys.argv[3:]
counts = {}
total = 0


async def read(stream):
    global total
    async with websockets.connect(f"{BASE}/ws/{stream}", max_size=2**23) as ws:
        async for message in ws:
            total += 1
            try:
                mes = json.loads(message)
                key = (mes.get("user"), mes.get("type"))
            except Exception:
                continue
            counts[key] = counts.get(key, 0) + 1


async def report():
    path = os.path.join(DATA_DIR, "count")
    while True:
        await asyncio.sleep(0.1)
        with open(path + ".tmp", "w") as f:
            f.write(str(total))
        os.replace(path + ".tmp", path)


async def main():
    await asyncio.gather(report(), *(read(s) for s in STREAMS))


asyncio.run(main())
