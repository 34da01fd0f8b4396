"""Run a scenario in a background thread while a tracer runs in the main thread.

``cttrace demo`` needs the lab's node namespace to exist before it can attach
(ctnetlink sockets are per namespace), then traffic, then the findings. So
:meth:`BackgroundScenario.start` builds the lab in the caller's thread (errors
such as NotRootError surface there, synchronously) and only the scenario's
steps run in the thread, each waiting for ``wait_ready`` first::

    with BackgroundScenario("recycled-ip", wait_ready=attached.is_set, on_step=print) as bg:
        source = open_source(netns=bg.node_netns)         # the node namespace exists now
        identity = follow_identity_file(bg.identity_path)
        attached.set()                                    # the scenario starts its traffic
        while not bg.done():
            ...                                           # trace
        result = bg.result()
    # leaving the block stops the scenario if still running and tears the lab down
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from cttrace.lab.addressing import Family
from cttrace.lab.node import Lab, ReadyCheck
from cttrace.lab.preconditions import LabError
from cttrace.lab.proxies import DEFAULT_PROXY
from cttrace.lab.results import ScenarioResult, StepCallback
from cttrace.lab.scenarios import get_scenario

#: How long closing waits for an aborted scenario's current step (a connect timeout at most).
JOIN_DEADLINE_S = 15.0


class BackgroundScenario:
    def __init__(
        self,
        name: str,
        *,
        instance: str | None = None,
        identity_path: Path | None = None,
        wait_ready: ReadyCheck | None = None,
        on_step: StepCallback | None = None,
        keep: bool = False,
        family: Family | str = Family.V4,
        proxy: str = DEFAULT_PROXY,
        **options: Any,
    ) -> None:
        self.scenario = get_scenario(name)
        self.lab = Lab(instance=instance, layout=self.scenario.layout,
                       identity_path=identity_path, keep=keep, family=family, proxy=proxy)
        self._wait_ready = wait_ready
        self._on_step = on_step
        self._options = options
        self._result: ScenarioResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"cttrace-lab-{name}", daemon=True)

    @property
    def node_netns(self) -> str:
        return self.lab.node_netns

    @property
    def identity_path(self) -> Path:
        return self.lab.identity_path

    def __enter__(self) -> BackgroundScenario:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Build the lab here and now, then start the scenario's thread."""
        self.lab.build()
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self.scenario.play(
                self.lab, wait_ready=self._wait_ready, on_step=self._on_step, **self._options
            )
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def done(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> ScenarioResult:
        """Wait for the scenario; re-raises its error, if it failed."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise LabError(f"scenario {self.scenario.name} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Stop the scenario at its next step if it still runs, then tear the lab down."""
        self.lab.abort()
        if self._thread.ident is not None:
            self._thread.join(JOIN_DEADLINE_S)
        self.lab.close()
