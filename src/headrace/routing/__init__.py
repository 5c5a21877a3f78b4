"""Which deployment serves a request: the model catalog now, balancing and fallbacks later."""
