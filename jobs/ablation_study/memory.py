"""Peak memory of the machine while an ablation seed runs (every process: Ray, MLflow, workers), sampled by a
background thread; what `result.json` reports under `memory`. Not a profiler of one process."""

from __future__ import annotations

import threading


class PeakMemory:
    """Samples the memory in use on this machine (every process: Ray, MLflow, workers) while the run goes."""

    def __init__(self, every_s: float = 1.0):
        import psutil

        self._psutil, self.every_s = psutil, every_s
        self.baseline = self.peak = psutil.virtual_memory().used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self._psutil.virtual_memory().used)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        gib = 1024 ** 3
        return {"baseline_gib": round(self.baseline / gib, 2), "peak_gib": round(self.peak / gib, 2),
                "peak_over_baseline_gib": round((self.peak - self.baseline) / gib, 2)}
