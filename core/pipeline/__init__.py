"""The study as a library: options, the model and its checkpoints, routing caches, the analyses in one pass, findings, outputs.

``BasicRoutingAnalysis(options=make_options(...)).run()`` (``core.pipeline.run``) does the whole
job; the command line (``core.commands.basic_routing_analysis``) only parses options into it.
"""
