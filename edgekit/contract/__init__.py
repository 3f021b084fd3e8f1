"""The contracts between edgekit's programs, each once, typed, imported by both sides.

    messages    what travels over MQTT: Result, Review, Trial, Status, Metrics, ResultBatch; one `encode` and
                one parse each (the agent and the transport encode, the hub parses, tests build with them)
    run         run.json as one typed model (RunMeta) and the run directory's layout: training writes it, export
                reads it, tests build fake runs with it

Imports nothing from the programs that use it (.importlinter).
"""
