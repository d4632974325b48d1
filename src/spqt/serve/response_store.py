"""The Responses API's stored responses (store: true, the default): what GET /v1/responses/{id} answers, what a request
naming it as its previous_response_id continues, and its input items, which GET /v1/responses/{id}/input_items lists.

In the server process's memory, lost when it stops: text alone (the response's JSON, the conversation's items), at
most `capacity` responses and MAX_BYTES of their JSON and input text (the newest kept whatever its size), the least
recently used (stored, retrieved, continued or listed) going first. A response holds its whole conversation, so that
it continues after the responses before it are gone; the items are shared with the response it continues, not copied
(each response holds its own list of them, and an answer's text is in its JSON and in its replayed items).
"""

from collections import OrderedDict
from dataclasses import dataclass

from spqt.serve import protocol as p
from spqt.serve.responses import InputItem, ResponseObject, replayed

# Responses kept (spqt serve --responses-store). Each holds its JSON, a few bytes an answer token plus the settings,
# but with logprobs about 90 bytes a token, with 20 top_logprobs 1.5 KB (6 MB for a 4,096-token answer; measured on
# chat_logprobs' JSON), and the items of its conversation, whose text its prompt held (within the context).
DEFAULT_CAPACITY = 256
MAX_BYTES = 512 * 2**20  # the stored responses' JSON and input text at most (logprobs make a long answer's JSON large)


@dataclass
class StoredResponse:
    body: str  # the response object's JSON, as its POST answered it (a stream: its last event's response)
    inputs: list[InputItem]  # the request's input items
    conversation: list[InputItem]  # earlier turns, the input and the output: what a request that continues it follows
    size: int  # what it counts against MAX_BYTES: its JSON's and its input items' characters


class ResponseStore:
    """Stored responses by id, at most capacity (0: none, and previous_response_id is refused)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_bytes: int = MAX_BYTES):
        self.capacity, self.max_bytes, self.size = capacity, max_bytes, 0
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()  # least recently used first

    def put(self, response: ResponseObject, inputs: list[InputItem], earlier: list[InputItem]) -> None:
        """Keep an ended response (completed or incomplete) to a request of these input items, which continued the
        conversation earlier (continued()'s, or none)."""
        if not self.capacity:
            return
        body = response.model_dump_json()
        size = len(body) + sum(len(item.model_dump_json()) for item in inputs)
        self.responses[response.id] = StoredResponse(body, inputs, [*earlier, *inputs, *replayed(response)], size)
        self.size += size
        while len(self.responses) > self.capacity or (self.size > self.max_bytes and len(self.responses) > 1):
            self.size -= self.responses.popitem(last=False)[1].size

    def get(self, response_id: str) -> StoredResponse:
        """A stored response (now the most recently used); 404 where none has this id."""
        if response_id not in self.responses:
            raise p.ApiError(404, f"Response with id '{response_id}' not found.", code="not_found")
        self.responses.move_to_end(response_id)
        return self.responses[response_id]

    def continued(self, response_id: str | None) -> list[InputItem]:
        """The conversation a request's previous_response_id continues (none without one): OpenAI's 404 where no
        response of that id is stored; a 400 with the store off."""
        if response_id is None:
            return []
        if not self.capacity:
            raise p.ApiError(400, "previous_response_id: this server stores no responses (spqt serve "
                             "--responses-store 0): send the whole conversation as the input.",
                             param="previous_response_id", code="unsupported_value")
        try:
            return self.get(response_id).conversation
        except p.ApiError:
            raise p.ApiError(404, f"Previous response with id '{response_id}' not found.",
                             param="previous_response_id", code="previous_response_not_found") from None

    def resolved(self, items: list[InputItem]) -> list[InputItem]:
        """items with each item_reference replaced by the stored item of its id (from the conversations of the stored
        responses, the most recently used first); OpenAI's 404 where none holds it."""
        if not any(item.type == "item_reference" for item in items):
            return items
        if not self.capacity:
            raise p.ApiError(400, "input: this server stores no responses (spqt serve --responses-store 0), so an "
                             "item_reference names nothing: send the item itself.", param="input",
                             code="unsupported_value")
        held = {}
        for stored in self.responses.values():  # (least recently used first: the later ones win)
            held.update((item.id, item) for item in stored.conversation)
        out = []
        for item in items:
            if item.type == "item_reference" and item.id not in held:
                raise p.ApiError(404, f"Item with id '{item.id}' not found.", param="input", code="not_found")
            out.append(held[item.id] if item.type == "item_reference" else item)
        return out

    def delete(self, response_id: str) -> dict:
        """Forget a stored response (404 where none has this id): OpenAI's deletion object."""
        self.size -= self.get(response_id).size
        del self.responses[response_id]
        return {"id": response_id, "object": "response.deleted", "deleted": True}
