"""The ops console: server-rendered pages at ``/console`` for staff (docs/CONSOLE.md).

* :mod:`.auth`: staff sign-in, the server-side session cookie, CSRF, roles, the actor;
* :mod:`.pages`: the pages and their forms, calling the same services as ``/v1``;
* ``templates/`` (Jinja2) and ``static/`` (plain CSS and a few lines of JavaScript, no
  build chain).
"""
