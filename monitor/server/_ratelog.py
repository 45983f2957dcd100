"""Moved to ``monitor._ratelog`` (the audit log rate-limits its warnings too); kept so that
``from monitor.server._ratelog import RateLimitedLog`` still works."""

from monitor._ratelog import RateLimitedLog

__all__ = ["RateLimitedLog"]
