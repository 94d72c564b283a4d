"""A prefix- and SLO-aware router (``cluster.router``), written against the Router protocol
of policies/routing.py:

    route(request, replicas) -> index, each replica a read-only ReplicaView with
    index, load(), outstanding_tokens(), prefix_match_tokens(request), can_ever_fit(request)

A request goes where its prompt's prefix is already cached (fewer tokens to prefill), unless
that replica's backlog would cost more than the reuse saves; a request with a tight TTFT
SLO (``slo_ttft_s`` at most ``tight_ttft_s``) goes to the shortest backlog outright, since
waiting behind a queue is what breaks a TTFT. Replicas that could never hold the request
are skipped. Backlog is measured in tokens still to process, which is what a queue costs.

    cluster:
      replicas: 4
      router: {class: slo_router.py:SloRouter, args: {tight_ttft_s: 0.5, reuse_weight: 1.0}}
"""


class SloRouter:
    name = "slo_prefix"

    def __init__(self, tight_ttft_s: float = 0.5, reuse_weight: float = 1.0):
        self.tight_ttft_s = tight_ttft_s
        self.reuse_weight = reuse_weight

    def route(self, request, replicas) -> int:
        fits = [r for r in replicas if r.can_ever_fit(request)] or list(replicas)
        slo = getattr(request, "slo_ttft_s", None)
        if slo is not None and slo <= self.tight_ttft_s:
            best = min(fits, key=lambda r: (r.outstanding_tokens(), r.load(), r.index))
        else:
            best = min(fits, key=lambda r: (r.outstanding_tokens() - self.reuse_weight * r.prefix_match_tokens(request),
                                            r.load(), r.index))
        return best.index
