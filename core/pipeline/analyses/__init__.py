"""The analyses of the study, one module each: importing a module registers its specs (``core.pipeline.spec``)."""
