"""fastworker for procrastinate's Django integration.

Add ``"fastworker.contrib.django"`` to ``INSTALLED_APPS`` (after
``"procrastinate.contrib.django"``), then run ``./manage.py fastworker --concurrency 50``
where you ran ``./manage.py procrastinate worker --concurrency 50``: the same flags as
``fastworker worker``, for procrastinate's Django app (``procrastinate.contrib.django.app``),
on the database of ``PROCRASTINATE_DATABASE_ALIAS``.
"""
