"""`fitrun tune`: the driver (`driver`) and the search it owns (`session`), the search algorithm
(`search`), one probe trial (`trial`, a Ray Tune function that drives a Ray Train run) and the report
(`report`)."""
