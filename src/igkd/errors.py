"""The one exception type users see.

Every error caused by bad input (a missing file, a wrong name, a corrupt archive,
a cache built for another model) is raised as :class:`IgkdError` with a message
that says what is wrong, where, and how to fix it. The CLI prints it as a single
``error: ...`` line and exits with status 2, without a traceback.
"""


class IgkdError(Exception):
    """Bad input or an unusable artefact; the message is shown to the user as is."""
