"""This process's memory, as a Serve replica reports it in /v1/stats (its own, and its vLLM engines')."""

from __future__ import annotations


def process_rss_bytes(children: bool = False) -> int:
    """This process's resident memory (`children`: that of the processes it started, e.g. its vLLM engines): a
    replica's leak shows in /v1/stats before it kills the node. Here, not in the app module: Ray Serve pickles the
    deployment class, and helpers it calls must come from an imported module."""
    import psutil

    me = psutil.Process()
    if not children:
        return me.memory_info().rss
    total = 0
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # it ended meanwhile
            pass
    return total
