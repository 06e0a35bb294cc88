"""The command lines of the scripts in ``exp/``: each module parses its arguments and calls the library.

``exp/<name>.py`` runs ``core.commands.<name>.main``; tests call ``main(argv)`` here directly.
"""
