"""Batches in Redis, for replicas: job state in hashes, the work queue in a Stream with a group.

Every key carries the hash tag ``{prefix:batch}``, so on Redis Cluster they live in one slot and the
scripts below may touch several. What is kept:

* ``{tag}:job:{id}``: a hash; ``record`` (the :class:`BatchRecord` as set at create) and the fields
  that change: ``status``, ``{status}_at`` times, ``output_file_id``, ``error_file_id``, ``errors``;
* ``{tag}:owner:{name}``: a sorted set of that key's batch ids by creation time (the list route);
* ``{tag}:active``: the set of batches not yet final (what runners sweep for finalisation);
* ``{tag}:done:{id}``: a hash, chunk number -> its :class:`ChunkDone` (set twice, still one);
* ``{tag}:work``: the Stream of chunks, read by the group ``runners``. A runner reads an entry
  (XREADGROUP), renews it while it works (XCLAIM to itself, which resets its idle time), records
  the outcome, then acknowledges and deletes it. An entry idle for ``idle_s`` belongs to a runner
  that died: the next claim takes it over (XAUTOCLAIM) and the chunk is redone whole.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, cast

import msgspec
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.core.batch.schemas import BatchErrorEntry, BatchRecord, BatchStatus
from gateway.core.batch.store import ChunkDone, Claim

__all__ = ["RedisJobs"]

_GROUP = "runners"

# KEYS[1] the job hash. ARGV: new status, allowed statuses (comma list), then field/value pairs.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return -1 end
for allowed in string.gmatch(ARGV[2], '[^,]+') do
  if allowed == current then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return 1
  end
end
return 0
"""

# KEYS[1] the lock; ARGV[1] its holder: deleted only by its holder.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_FIELDS = ("output_file_id", "error_file_id")


class RedisJobs:
    def __init__(self, client: Redis | RedisCluster, prefix: str) -> None:
        # redis-py's stubs type replies as unions of every reply shape; ours are known, bytes ones.
        self.client: Any = client
        self.tag = "{" + prefix + ":batch}"
        self.stream = f"{self.tag}:work"
        self._transition = client.register_script(_TRANSITION)
        self._unlock = client.register_script(_UNLOCK)

    def _job(self, batch_id: str) -> str:
        return f"{self.tag}:job:{batch_id}"

    def _done(self, batch_id: str) -> str:
        return f"{self.tag}:done:{batch_id}"

    async def start(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, _GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # made by another replica already: fine
                raise

    async def close(self) -> None:
        await self.client.aclose()

    async def create(self, record: BatchRecord) -> None:
        job = self._job(record.id)
        # All or nothing: a job with some of its chunks queued would never finish.
        pipe = self.client.pipeline(transaction=not isinstance(self.client, RedisCluster))
        fields: dict[str, Any] = {"record": msgspec.json.encode(record), "status": record.status}
        for name, at in record.times.items():
            fields[name] = at
        pipe.hset(job, mapping=fields)
        pipe.zadd(f"{self.tag}:owner:{record.owner}", {record.id: record.created_at})
        pipe.sadd(f"{self.tag}:active", record.id)
        for chunk in range(record.chunks):
            pipe.xadd(self.stream, {"batch": record.id, "chunk": chunk})
        await pipe.execute()

    async def get(self, batch_id: str) -> BatchRecord | None:
        fields = await self.client.hgetall(self._job(batch_id))
        return _record(fields) if fields else None

    async def page(self, owner: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        index = f"{self.tag}:owner:{owner}"
        start = 0
        if after is not None:
            rank = await self.client.zrevrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = await self.client.zrevrange(index, start, start + limit)  # one more: is there a next page
        pipe = self.client.pipeline(transaction=False)
        for batch_id in ids[:limit]:
            pipe.hgetall(self._job(batch_id.decode()))
        records = [_record(fields) for fields in await pipe.execute() if fields]
        return records, len(ids) > limit

    async def transition(self, batch_id: str, to: str, *, allowed: Collection[str], **fields: object) -> bool:
        args: list[Any] = [to, ",".join(allowed), f"{to}_at", fields.pop("at")]
        for name, value in fields.items():
            if value is not None:  # None: stays unset
                args += [name, value if isinstance(value, str) else msgspec.json.encode(value)]
        changed = int(await self._transition(keys=[self._job(batch_id)], args=args)) == 1
        if changed and to in ("completed", "failed", "expired", "cancelled"):
            await self.client.srem(f"{self.tag}:active", batch_id)
        return changed

    async def claim(self, consumer: str, *, idle_s: float, wait_s: float) -> Claim | None:
        # A dead runner's chunk first: it is the oldest work there is.
        reclaimed = await self.client.xautoclaim(
            self.stream, _GROUP, consumer, min_idle_time=int(idle_s * 1000), start_id="0-0", count=1
        )
        entries = reclaimed[1] if reclaimed else []
        if not entries:
            read = await self.client.xreadgroup(
                _GROUP, consumer, {self.stream: ">"}, count=1, block=max(1, int(wait_s * 1000))
            )
            entries = read[0][1] if read else []
        for entry_id, fields in entries:
            if fields:  # an entry deleted while pending comes back empty: nothing to run
                return Claim(fields[b"batch"].decode(), int(fields[b"chunk"]), entry_id.decode())
            await self.client.xack(self.stream, _GROUP, entry_id)
        return None

    async def keep(self, claim: Claim, consumer: str) -> None:
        await self.client.xclaim(
            self.stream, _GROUP, consumer, min_idle_time=0, message_ids=[claim.handle], justid=True
        )

    async def finish(self, claim: Claim, done: ChunkDone) -> None:
        pipe = self.client.pipeline(transaction=False)
        # The first outcome stays: a stale copy of the chunk (its holder was thought dead and it was
        # redone, or a batch already final skips it) must not count its lines again, or none.
        pipe.hsetnx(self._done(claim.batch_id), str(claim.chunk), msgspec.json.encode(done))
        pipe.xack(self.stream, _GROUP, claim.handle)
        pipe.xdel(self.stream, claim.handle)
        await pipe.execute()

    async def release(self, claim: Claim, consumer: str) -> None:
        # A stream entry cannot be un-read: the chunk is queued anew and the held entry dropped;
        # unless another runner took it over meanwhile (then it is theirs to finish).
        held = await self.client.xpending_range(self.stream, _GROUP, min=claim.handle, max=claim.handle, count=1)
        if not held or _text(held[0]["consumer"]) != consumer:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.stream, {"batch": claim.batch_id, "chunk": claim.chunk})
        pipe.xack(self.stream, _GROUP, claim.handle)
        pipe.xdel(self.stream, claim.handle)
        await pipe.execute()

    async def outcomes(self, batch_id: str) -> dict[int, ChunkDone]:
        found = await self.client.hgetall(self._done(batch_id))
        return {int(chunk): msgspec.json.decode(value, type=ChunkDone) for chunk, value in found.items()}

    async def active(self) -> list[str]:
        return sorted(member.decode() for member in await self.client.smembers(f"{self.tag}:active"))

    async def lock(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        # One taker while it lasts, even the same holder again (two finalisers of one process).
        return bool(await self.client.set(f"{self.tag}:final:{batch_id}", holder, nx=True, px=int(ttl_s * 1000)))

    async def unlock(self, batch_id: str, holder: str) -> None:
        await self._unlock(keys=[f"{self.tag}:final:{batch_id}"], args=[holder])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(fields: dict[bytes, bytes]) -> BatchRecord:
    record = msgspec.json.decode(fields[b"record"], type=BatchRecord)
    record.status = cast(BatchStatus, fields[b"status"].decode())
    for name, value in fields.items():
        key = name.decode()
        if key.endswith("_at") and key not in ("created_at", "expires_at"):
            record.times[key] = int(value)
        elif key in _FIELDS:
            setattr(record, key, value.decode())
        elif key == "errors":
            record.errors = msgspec.json.decode(value, type=list[BatchErrorEntry])
    return record
