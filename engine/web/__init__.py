"""The web console (issue #11): pages served by the admin app at ``/`` on the admin API's host and port.

:mod:`engine.web.console` holds the routes; templates are under ``templates/`` and every asset the
pages use under ``static/`` (no CDN: the console works offline).  Pure helpers are in
:mod:`engine.web.render` and :mod:`engine.web.sessions`.
"""

from engine.web.console import mount

__all__ = ["mount"]
