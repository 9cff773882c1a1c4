"""Load-and-invariants harness for callora-credits (see docs/reliability.md).

``stress.app`` is a host app, ``stress.client`` the HTTP load generator,
``stress.faults`` the fault injectors, ``stress.harness`` the orchestration
and the end-state checks, ``stress.run`` the command line.
"""
