"""The scheduler: routes jobs to workers and answers job state from a live mirror of their feeds."""
