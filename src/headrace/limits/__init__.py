"""Rate limits, parallel-request limits and budget counters: reserve before a call, settle after."""
