"""Who is asking, and fair turns between askers.

- `--api-keys FILE`: named API keys, each with an optional limit of queued jobs (`read_api_keys`);
- `CLIENT`: the name of the client the current request comes from, set by the app's auth middleware; every `Job`
  made while handling the request records it (its `client` field);
- `FairQueue`: the worker's queue, one lane per client, served in turn (round robin over the clients that have
  jobs waiting), so that one client's hundred jobs do not make everyone else wait behind them.
"""
from __future__ import annotations

import contextvars
import re
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from ..errors import KilnError

# "" is the anonymous lane: without API keys or credentials every request shares it, and the queue is plain FIFO
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("kiln_client", default="")


def current_client() -> str:
    return CLIENT.get()


@dataclass(frozen=True)
class ApiKey:
    name: str
    key: str
    max_queued: int | None = None  # jobs of this key waiting at once; None: only the server's --queue-size

    def __repr__(self):  # never print the secret (logs, tracebacks)
        return f"ApiKey(name={self.name!r}, max_queued={self.max_queued})"


_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def parse_api_keys(text: str, source: str = "--api-keys") -> list[ApiKey]:
    """Lines `name:key[:max_queued]`; blank lines and lines starting with # are skipped. Names are 1-64 letters,
    digits or `_.@-` and unique, keys at least 8 characters and unique, max_queued a whole number >= 1."""
    keys, names, secrets = [], set(), set()
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        where = f"{source} line {no}"
        if len(parts) not in (2, 3):
            raise KilnError(f"{where}: want name:key or name:key:max_queued")
        name, key = parts[0].strip(), parts[1].strip()
        if not _NAME.fullmatch(name):
            raise KilnError(f"{where}: the name must be 1 to 64 letters, digits or _ . @ -, got {name!r}")
        if len(key) < 8 or any(c.isspace() for c in key):
            raise KilnError(f"{where}: the key of {name!r} must be at least 8 characters, without spaces")
        limit = None
        if len(parts) == 3:
            if not parts[2].strip().isdigit() or int(parts[2]) < 1:
                raise KilnError(f"{where}: max_queued of {name!r} must be a whole number of at least 1, "
                                f"got {parts[2].strip()!r}")
            limit = int(parts[2])
        if name in names:
            raise KilnError(f"{where}: the name {name!r} is used twice")
        if key in secrets:
            raise KilnError(f"{where}: the key of {name!r} is another key's too")
        names.add(name)
        secrets.add(key)
        keys.append(ApiKey(name, key, limit))
    if not keys:
        raise KilnError(f"{source}: no keys in the file")
    return keys


def read_api_keys(path: str) -> list[ApiKey]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"--api-keys {path}: cannot read it ({e.__class__.__name__})") from None
    return parse_api_keys(text, f"--api-keys {path}")


class KeyLimit(Exception):
    """A client has as many jobs waiting as its key allows: answered 429 with Retry-After."""

    def __init__(self, client: str, limit: int, ahead: int):
        super().__init__(f"API key {client!r} already has {limit} jobs queued, its limit; retry later")
        self.client, self.limit = client, limit
        self.ahead = ahead  # jobs that start before this client's next one: Retry-After is estimated from it


class FairQueue:
    """The waiting jobs, one lane (FIFO) per client, served in turn: `popleft` takes the first job of the lane
    whose turn it is, and that lane goes to the back of the rotation. A client that had nothing waiting joins at
    the back. Iterating gives the order jobs would start in if nothing else arrived (what `index` and the job
    API's `position` report). Used like the `deque` it replaces: append, appendleft, popleft, remove, index, len,
    in, iter.

    `limits`: client name -> the most jobs it may have waiting (`append` raises `KeyLimit` beyond it). The worker
    calls every method under its lock."""

    def __init__(self, limits: dict[str, int] | None = None):
        self.lanes: OrderedDict[str, deque] = OrderedDict()  # in rotation order: the next lane to serve first
        self.limits: dict[str, int] = dict(limits or {})

    def append(self, job, check_limit: bool = True):
        """Queue a job at the back of its client's lane. `check_limit=False`: jobs the server takes back (a job
        store restoring its queue after a restart) are queued even beyond the key's limit."""
        client = job.client
        lane = self.lanes.get(client)
        limit = self.limits.get(client) if check_limit else None
        if limit is not None and lane is not None and len(lane) >= limit:
            raise KeyLimit(client, limit, self.index(lane[0]))
        if lane is None:
            lane = self.lanes[client] = deque()
        lane.append(job)

    def appendleft(self, job):
        """Put a job first: at the front of its lane, and its lane first in the rotation (a job taken back to run
        again before anything else, e.g. the one that was running when the server stopped)."""
        lane = self.lanes.get(job.client)
        if lane is None:
            lane = self.lanes[job.client] = deque()
        lane.appendleft(job)
        self.lanes.move_to_end(job.client, last=False)

    def popleft(self):
        if not self.lanes:
            raise IndexError("pop from an empty queue")
        client, lane = next(iter(self.lanes.items()))
        job = lane.popleft()
        if lane:
            self.lanes.move_to_end(client)
        else:
            del self.lanes[client]
        return job

    def remove(self, job):
        lane = self.lanes.get(job.client)
        if lane is None:
            raise ValueError("the job is not queued")
        for i, j in enumerate(lane):  # by identity: a Job's dataclass == would compare every field
            if j is job:
                del lane[i]
                break
        else:
            raise ValueError("the job is not queued")
        if not lane:
            del self.lanes[job.client]

    def __iter__(self):
        # round k serves the k-th job of every lane that has one, lanes in rotation order
        lanes = [list(lane) for lane in self.lanes.values()]
        for k in range(max(map(len, lanes), default=0)):
            for lane in lanes:
                if k < len(lane):
                    yield lane[k]

    def index(self, job) -> int:
        for i, j in enumerate(self):
            if j is job:
                return i
        raise ValueError("the job is not queued")

    def __len__(self):
        return sum(map(len, self.lanes.values()))

    def __bool__(self):
        return bool(self.lanes)

    def __contains__(self, job):
        lane = self.lanes.get(job.client)
        return lane is not None and any(j is job for j in lane)

    def waiting(self) -> dict[str, int]:
        """Jobs waiting per client."""
        return {client: len(lane) for client, lane in self.lanes.items()}
