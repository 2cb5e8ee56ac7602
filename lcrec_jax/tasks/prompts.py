"""Prompt templates of the six LC-Rec alignment tasks.

Every task has several templates (one is sampled per training example, a chosen one is
used in evaluation). A template is an instruction and a response, both ``str.format``
strings over these placeholders:

  ``{history}``         item codes of the user's history, oldest first, ``", "`` separated
  ``{history_titles}``  the same history as quoted titles
  ``{item}``            the target item's code, e.g. ``<a_12><b_3><c_200><d_7>``
  ``{title}``           the target item's title
  ``{description}``     the target item's other text (description, or year and genres)
  ``{preference}``      the user's preference in words
  ``{query}``           a search query that the target item answers

The wording is this project's own; the task family and the split of each task into
sub-kinds (title / description / both; code / text outputs) follow LC-Rec
(Zheng et al., ICDE 2024). A template whose placeholders cannot all be filled for an
example (e.g. an item with no description) is skipped for that example.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Mapping

HISTORY_SEP = ", "


@dataclasses.dataclass(frozen=True)
class Template:
  """One instruction/response pair of format strings."""

  instruction: str
  response: str

  @functools.cached_property
  def fields(self) -> frozenset[str]:
    """Placeholder names used by the instruction and the response."""
    names = set()
    for text in (self.instruction, self.response):
      for _, name, _, _ in string.Formatter().parse(text):
        if name is not None:
          names.add(name)
    return frozenset(names)

  def render(self, values: Mapping[str, str]) -> tuple[str, str]:
    """Fill both strings; raises KeyError naming a missing placeholder."""
    try:
      return self.instruction.format(**values), self.response.format(**values)
    except KeyError as e:
      raise KeyError(f"template needs placeholder {e.args[0]!r}: {self.instruction!r}") from None


def _t(instruction: str, response: str) -> Template:
  return Template(instruction, response)


SEQREC = (
    _t("A user interacted with these items, oldest first: {history}. Which item will they "
       "pick next?", "{item}"),
    _t("Given the chronological interaction history {history}, predict the user's next item.",
       "{item}"),
    _t("The items below were chosen by one user in this order: {history}. Recommend the "
       "single item they are most likely to want next.", "{item}"),
    _t("Interaction log, earliest to latest: {history}. What should this user be offered next?",
       "{item}"),
    _t("Look at the sequence of items a user engaged with: {history}. Name the item that "
       "naturally follows.", "{item}"),
    _t("Based on the past items {history}, listed in the order they happened, suggest what "
       "the user will choose next.", "{item}"),
    _t("Predict the upcoming interaction of a user whose history reads {history}.", "{item}"),
    _t("You are a recommender system. The user's items so far, in order, are {history}. "
       "Choose the next item for them.", "{item}"),
    _t("After going through {history} in sequence, which item is this user going to engage "
       "with next?", "{item}"),
    _t("From the ordered history {history}, work out the user's taste and return the best "
       "next item.", "{item}"),
)

ITEM2INDEX = (
    # title -> code
    _t("Which item is titled \"{title}\"?", "{item}"),
    _t("Give the identifier of the item named \"{title}\".", "{item}"),
    _t("There is an item called \"{title}\". Which item is it?", "{item}"),
    _t("Find the item whose title is \"{title}\".", "{item}"),
    # description -> code
    _t("Which item matches this description: \"{description}\"?", "{item}"),
    _t("An item is described as follows: \"{description}\". Identify it.", "{item}"),
    _t("Return the item that has these properties: \"{description}\".", "{item}"),
    # title + description -> code
    _t("An item is named \"{title}\" and described as \"{description}\". Which item is it?",
       "{item}"),
    _t("Identify the item from its title \"{title}\" and its details \"{description}\".",
       "{item}"),
    _t("Title: \"{title}\". Details: \"{description}\". Which item do these belong to?",
       "{item}"),
)

INDEX2ITEM = (
    # code -> title
    _t("What is the title of item {item}?", "{title}"),
    _t("Tell me the name of item {item}.", "{title}"),
    _t("Item {item} is called what?", "{title}"),
    _t("Which title belongs to item {item}?", "{title}"),
    # code -> description
    _t("Describe item {item}.", "{description}"),
    _t("What are the details of item {item}?", "{description}"),
    _t("Give a short description of item {item}.", "{description}"),
    # code -> title + description
    _t("What is item {item}? Give its title and its details.", "{title}\n{description}"),
    _t("Name item {item} and describe it.", "{title}\n{description}"),
    _t("Provide the title and a description of item {item}.", "{title}\n{description}"),
)

FUSIONSEQREC = (
    # history codes -> next title
    _t("A user interacted with {history} in this order. What is the title of the item they "
       "will choose next?", "{title}"),
    _t("Given the ordered history {history}, name the next item the user will want by its "
       "title.", "{title}"),
    _t("Interaction log, earliest to latest: {history}. Give the title of the user's next item.",
       "{title}"),
    _t("Predict the next item for a user whose history is {history}, and answer with its "
       "title.", "{title}"),
    # history codes -> next description
    _t("A user interacted with {history} in order. Describe the item they are likely to "
       "choose next.", "{description}"),
    _t("From the history {history}, what should the user's next item be like?",
       "{description}"),
    _t("Looking at the ordered items {history}, describe what the user will look for next.",
       "{description}"),
    # history titles -> next code
    _t("A user enjoyed these titles in order: {history_titles}. Which item should come next?",
       "{item}"),
    _t("The titles of a user's past items, oldest first, are {history_titles}. Recommend the "
       "next item.", "{item}"),
    _t("Given the title history {history_titles}, predict the user's next item.", "{item}"),
    _t("Here is what a user chose so far, by title and in order: {history_titles}. Which "
       "item follows?", "{item}"),
)

ITEMSEARCH = (
    # query only
    _t("A user searches for: \"{query}\". Which item answers the search?", "{item}"),
    _t("Act as a search engine and return the item that best fits the query \"{query}\".",
       "{item}"),
    _t("Find an item for this request: \"{query}\".", "{item}"),
    _t("Which item would you show for the query \"{query}\"?", "{item}"),
    # preference (+ history)
    _t("A user with the history {history} is described like this: \"{preference}\". "
       "Recommend an item that suits this preference.", "{item}"),
    _t("User preference: \"{preference}\". Past items: {history}. Pick an item that fits.",
       "{item}"),
    # query + preference + history
    _t("A user who interacted with {history} and whose taste is \"{preference}\" now "
       "searches for \"{query}\". Which item fits both the search and the taste?", "{item}"),
    _t("Search: \"{query}\". Known preference: \"{preference}\". History: {history}. "
       "Return the most suitable item.", "{item}"),
    _t("The user wants \"{query}\". Their past items {history} show this taste: "
       "\"{preference}\". Select a matching item.", "{item}"),
    # query + history
    _t("After interacting with {history}, a user searches for \"{query}\". Which item should "
       "be returned?", "{item}"),
)

PREFERENCEOBTAIN = (
    _t("A user interacted with {history} in this order. Describe their preferences.",
       "{preference}"),
    _t("Summarise the taste of a user whose history is {history}.", "{preference}"),
    _t("From the chronological items {history}, what does this user like?", "{preference}"),
    _t("What preferences can be read from the interaction history {history}?",
       "{preference}"),
    _t("Here is a user's history, oldest first: {history}. Explain what kind of items they "
       "favour.", "{preference}"),
    _t("Infer the user's preferences from their past items {history}.", "{preference}"),
    _t("Given that a user went through {history} in order, characterise their taste.",
       "{preference}"),
    _t("Read the history {history} and state the user's preferences in a sentence.",
       "{preference}"),
    _t("Which kinds of items does the user with history {history} prefer?", "{preference}"),
)

TEMPLATES: dict[str, tuple[Template, ...]] = {
    "seqrec": SEQREC,
    "item2index": ITEM2INDEX,
    "index2item": INDEX2ITEM,
    "fusionseqrec": FUSIONSEQREC,
    "itemsearch": ITEMSEARCH,
    "preferenceobtain": PREFERENCEOBTAIN,
}

TASK_NAMES: tuple[str, ...] = tuple(TEMPLATES)


def templates(task: str) -> tuple[Template, ...]:
  """The templates of ``task``; raises ValueError naming the unknown task."""
  try:
    return TEMPLATES[task]
  except KeyError:
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}") from None
