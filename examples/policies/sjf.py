"""Shortest job first, with an aging bound (``scheduler.order``).

The waiting request with the fewest tokens to process (prompt + output) is admitted first,
so short requests stop queueing behind long ones: mean latency falls. Left at that, a long
request arriving into a steady stream of short ones would wait for as long as the stream
lasts; the aging bound caps it: a request overtaken ``max_overtakes`` times (a request that
arrived after it was picked before it) goes next, oldest first. ``sim check-policy`` holds
any order policy to 16 overtakes by default.

The simulator forces each request's output length (``output_len``), so this SJF knows the
job's size exactly: an oracle. A real deployment would rank by a predicted output length.

    scheduler:
      order: {class: sjf.py:ShortestJobFirst, args: {max_overtakes: 8}}
"""


class ShortestJobFirst:
    name = "sjf"

    def __init__(self, max_overtakes: int = 8):
        if max_overtakes < 0:
            raise ValueError("max_overtakes must be >= 0")
        self.max_overtakes = max_overtakes
        self.overtaken: dict[int, int] = {}  # request_id -> times a later arrival was picked first

    def pick(self, waiting) -> int:
        """`waiting`: read-only views in arrival order (request_id, arrival_s, prompt_len,
        output_len, priority, tenant, preemptions); returns the index to admit next."""
        over = self.overtaken
        views = list(waiting)
        aged = [i for i, w in enumerate(views) if over.get(w.request_id, 0) >= self.max_overtakes]
        if aged:
            i = aged[0]
        else:
            i = min(range(len(views)), key=lambda j: (views[j].prompt_len + views[j].output_len, j))
        for w in views[:i]:  # the earlier arrivals it passes
            over[w.request_id] = over.get(w.request_id, 0) + 1
        # Keep the counts of the requests still waiting, the one picked included: when the
        # pool is short it is not admitted and the engine asks again, and it must stay aged.
        # (Popping its count here starved requests under static batching: sim check-policy
        # found it.)
        self.overtaken = {w.request_id: over[w.request_id] for w in views if w.request_id in over}
        return i
