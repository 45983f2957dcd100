"""Generated wire code for ``proto/safety_monitor/v1/monitor.proto`` (never edit by hand).

Regenerate with ``make proto``; only ``monitor.server`` and ``monitor.client`` import from here.
"""
