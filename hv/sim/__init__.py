"""A faithful simulated Xen: machine frames, domains, PV guests, log-dirty; and a seeded guest builder."""
