"""Every ORM model, imported in one place so Alembic and the mappers see all tables."""

from heron.agents.models import Agent, AgentVersion
from heron.db.base import Base
from heron.files.models import File
from heron.knowledge.models import Chunk, Document, KeywordTerm, KnowledgeBase, TermBlock
from heron.providers.models import Provider
from heron.runs.models import Run, RunEvent, Step
from heron.tenancy.models import ApiKey, Membership, User, Workspace
from heron.threads.models import Message, Thread

__all__ = [
    "Agent",
    "AgentVersion",
    "ApiKey",
    "Base",
    "Chunk",
    "Document",
    "File",
    "KeywordTerm",
    "KnowledgeBase",
    "Membership",
    "Message",
    "Provider",
    "Run",
    "RunEvent",
    "Step",
    "TermBlock",
    "Thread",
    "User",
    "Workspace",
]
