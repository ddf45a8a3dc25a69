"""Data: conversation files, chat tokenization with loss masks, benchmark prompts."""

from deepspec.data.chat import ChatTokenizer, TokenizedChat, TokenizeStats, load_chat_template
from deepspec.data.conversations import Conversation, ReadStats, parse_conversation, read_conversations
from deepspec.data.eval_prompts import EvalPrompt, available_tasks, load_eval_prompts

__all__ = [
    "ChatTokenizer",
    "Conversation",
    "EvalPrompt",
    "ReadStats",
    "TokenizeStats",
    "TokenizedChat",
    "available_tasks",
    "load_chat_template",
    "load_eval_prompts",
    "parse_conversation",
    "read_conversations",
]
