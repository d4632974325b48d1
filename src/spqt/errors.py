"""The one exception type the CLI turns into a single error line and exit code 2."""


class SpqtError(Exception):
    """A user-facing error: bad input, unsupported model, impossible request.

    The message is one line meant for a person; the CLI prints it without a traceback.
    """
