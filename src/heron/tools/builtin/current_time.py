"""`current_time`: the date and time now, in an IANA time zone."""

from __future__ import annotations

import asyncio
import difflib
import zoneinfo
from typing import Annotated

from pydantic import Field, JsonValue

from heron.tools.registry import Tool, ToolArguments, ToolContext, ToolInputError, ToolRegistry

# Files of the zone database that are not zones to suggest.
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})
# Not strftime("%A"): that follows the process locale.
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class CurrentTimeArgs(ToolArguments):
    timezone: Annotated[
        str,
        Field(
            max_length=64,
            description="IANA time zone name, such as `Europe/Paris`, `America/New_York`, "
            "`Asia/Tokyo` or `UTC`.",
        ),
    ] = "UTC"


def _load_zone(name: str) -> zoneinfo.ZoneInfo:
    """The zone, or ToolInputError naming close matches; reads the zone database (blocking)."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        pass
    zones = zoneinfo.available_timezones() - _NOT_ZONES
    by_lower = {z.lower(): z for z in zones}
    if name.lower() in by_lower:  # a zone spelled in the wrong case is that zone
        return zoneinfo.ZoneInfo(by_lower[name.lower()])
    city = name.strip().replace(" ", "_").lower()  # "new york" names America/New_York
    close = [z.lower() for z in sorted(zones) if z.rsplit("/", 1)[-1].lower() == city]
    close += difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.6)
    close = list(dict.fromkeys(close))[:3]
    hint = (
        "did you mean " + " or ".join(repr(by_lower[c]) for c in close) + "?"
        if close
        else "use an IANA name such as 'Europe/Paris', 'America/New_York' or 'UTC'"
    )
    raise ToolInputError(f"unknown time zone {name!r}: {hint}")


async def current_time(ctx: ToolContext, args: CurrentTimeArgs) -> dict[str, JsonValue]:
    name = args.timezone.strip() or "UTC"
    zone = await asyncio.to_thread(_load_zone, name)
    now = ctx.clock().astimezone(zone)
    offset = now.strftime("%z")
    year, week, _ = now.isocalendar()
    return {
        "timezone": zone.key,
        "iso": now.isoformat(timespec="seconds"),
        "date": now.date().isoformat(),
        "time": now.strftime("%H:%M:%S"),
        "weekday": _WEEKDAYS[now.weekday()],
        "utc_offset": f"{offset[:3]}:{offset[3:]}",
        "abbreviation": now.tzname() or "",
        "dst": bool(now.dst()),
        "iso_week": f"{year}-W{week:02d}",
        "unix": int(now.timestamp()),
    }


current_time_tool = Tool(
    name="current_time",
    description=(
        "Get the current date and time in a time zone (default UTC): ISO 8601 timestamp, date, "
        "time, weekday, UTC offset, zone abbreviation, daylight saving, ISO week and Unix time. "
        "Use it whenever the answer depends on today's date or the time of day."
    ),
    arguments=CurrentTimeArgs,
    function=current_time,
)


def register_tools(registry: ToolRegistry) -> None:
    registry.register(current_time_tool)
