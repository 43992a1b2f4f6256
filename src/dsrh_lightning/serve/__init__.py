"""See the codes: the local search page (:mod:`.app`, Flask) and the images behind index ids (:mod:`.ids`)."""
