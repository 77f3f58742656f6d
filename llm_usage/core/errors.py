"""The exception tree. Anything a person can fix ends as one line on stderr, never a traceback."""


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""


class UserFacingError(PipelineError):
    """A mistake a person can fix (configuration, arguments, a service that cannot be reached).

    The message is the whole answer: what is wrong and what to do about it.
    """


class ConfigurationError(UserFacingError):
    """An environment variable or argument has a value we cannot use."""


class ServiceUnreachableError(UserFacingError):
    """Kafka or PostgreSQL did not answer."""


class MissingTopicError(UserFacingError):
    """A consumer was started for a topic that does not exist."""


class LocalServiceError(UserFacingError):
    """The local Kafka or PostgreSQL launched by `llm-usage dev` could not be started or stopped."""


class TransientError(PipelineError):
    """A failure that goes away by itself or once someone fixes a service: the work is retried,
    never dropped (e.g. the database refusing every new row, a row that vanished mid-batch)."""
