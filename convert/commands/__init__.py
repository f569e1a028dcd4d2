"""Subcommands of `xenstream`, one module each.

A module here registers itself by defining `register(subparsers)`, which adds its parser and sets
`func` (taking the parsed namespace, returning an exit code). The CLI discovers modules by name, so
adding a command touches no shared file. A module named `NAME_suffix` is a plug-in of command
`NAME`: it is imported together with `NAME` (see cli.command_modules), after it.
"""
