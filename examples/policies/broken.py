"""Two deliberately broken policies: what ``sim check-policy`` is for (tests/test_check_policy.py).

``OverCommit`` (``scheduler.capacity``) admits a request when its prompt's blocks are free,
as max_utilization does, but declares it never runs short (``pauses_on_shortage = False``)
and reserves nothing: once generation outgrows the pool, the running requests take blocks
that are not there -- a block owned twice, the pool's counters leaking past its size.

``Lifo`` (``scheduler.order``) admits the newest waiting request first: under a stream the
oldest one is overtaken by every later arrival for as long as the stream lasts (starvation).
"""


class OverCommit:
    name = "over_commit"
    admit_while_busy = True
    pauses_on_shortage = False  # the bug: it admits like max_utilization, which must pause
    reserves = False

    def admits(self, kv, headroom, need) -> bool:
        return need.ctx_blocks + need.new_refs <= kv.available


class Lifo:
    name = "lifo"

    def pick(self, waiting) -> int:
        return len(waiting) - 1
