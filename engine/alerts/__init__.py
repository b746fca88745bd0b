"""Built-in alerts (issue #10): ``alerts:`` rules in routes.yaml → incidents → sinks.

* :mod:`engine.alerts.config`: the ``alerts:`` section → frozen :class:`AlertsConfig`.
* :mod:`engine.alerts.evaluator`: pure; snapshots of observations → ``firing``/``resolved`` notices,
  one incident per (rule, subject), hysteresis so a flapping subject never makes a storm.
* :mod:`engine.alerts.sinks`: webhook (HMAC-signed), log, SMTP.
* :mod:`engine.alerts.runner`: the loop in the engine and the snapshot it reads from the store and workers.

Only the config and the evaluator are imported here (``engine.config`` needs the config types; the
worker processes import it): the sinks and the runner are imported where the engine starts them.
"""

from engine.alerts.config import AlertRule, AlertsConfig, parse_alerts
from engine.alerts.evaluator import Evaluator, Notice, Snapshot

__all__ = ["AlertRule", "AlertsConfig", "Evaluator", "Notice", "Snapshot", "parse_alerts"]
