"""The fixed probe set the int8 quality gate measures: queries against documents, in several languages.

Prose and code, short and long, English and not: what a retrieval index holds. The gate embeds
every text with the float32 model and with the int8 one and compares (worst and mean cosine of the
same text's two vectors; for each query, how many of fp32's top 10 documents int8 also ranks in its
top 10). Everything here is literal data, so the figures are the same on every run of one machine.
Changing a text changes the gate: bump :data:`PROBE_VERSION` with it (stored references are keyed
by it).
"""

from __future__ import annotations

__all__ = ["PROBE_DOCUMENTS", "PROBE_QUERIES", "PROBE_VERSION", "long_probe_texts", "probe_texts"]

# p2: the long probes (:func:`long_probe_texts`), embedded alone, past the 512 tokens the set is cut at.
PROBE_VERSION = "p2"

_PROSE = [
    "The cache stores each embedding under a hash of the model fingerprint and the text, so a repeated "
    "text costs one Redis lookup instead of a forward pass.",
    "Photosynthesis converts light energy into chemical energy: chlorophyll absorbs red and blue light, "
    "water is split, oxygen is released and carbon dioxide is fixed into sugars in the Calvin cycle.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War and is often cited as the origin of "
    "the modern system of sovereign states in Europe.",
    "To reset your password, open Settings, choose Security, click 'Forgot password' and follow the link "
    "we send to the e-mail address on your account. The link expires after 30 minutes.",
    "Refunds are issued to the original payment method within 5 to 10 business days after we receive "
    "the returned item in its original packaging.",
    "A transformer encoder maps a sequence of token embeddings through layers of self-attention and "
    "feed-forward blocks; mean pooling of the last hidden states gives one sentence vector.",
    "Espresso is brewed by forcing hot water under about nine bars of pressure through finely ground "
    "coffee; a good shot takes 25 to 30 seconds and has a layer of crema on top.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level; the first confirmed ascent "
    "was by Tenzing Norgay and Edmund Hillary in 1953.",
    "Interest rates rose sharply in 2022 as central banks tried to bring inflation back towards two "
    "percent, which raised mortgage payments for millions of households.",
    "The mitochondrion is the site of oxidative phosphorylation, where the electron transport chain "
    "builds a proton gradient that drives ATP synthase.",
    "Our office is closed on public holidays. Support tickets opened on a holiday are answered on the "
    "next working day, in the order they arrived.",
    "Kubernetes restarts a container whose liveness probe fails, and stops sending traffic to a pod "
    "whose readiness probe fails until it passes again.",
    "Vaccines train the immune system by presenting an antigen, so memory B and T cells respond faster "
    "when the real pathogen appears.",
    "The Great Barrier Reef off Queensland is the largest coral reef system in the world and is visible "
    "from space; rising sea temperatures cause mass bleaching events.",
    "Quarterly revenue grew 12% year over year, driven by subscriptions, while hardware sales declined "
    "and operating margin narrowed to 18%.",
    "A binary search halves the search interval each step, so it finds an item in a sorted array of n "
    "elements in O(log n) comparisons.",
    "Sourdough bread rises with a culture of wild yeast and lactic acid bacteria; a long cold ferment "
    "gives it a sour taste and an open crumb.",
    "The goalkeeper saved a penalty in the last minute, and the match ended in a goalless draw that "
    "kept both teams out of the relegation zone.",
    "Photosynthesis in C4 plants such as maize concentrates carbon dioxide in bundle-sheath cells, "
    "which reduces photorespiration in hot, dry climates.",
    "Redis evicts keys with the allkeys-lru policy when maxmemory is reached, removing the least "
    "recently used keys first.",
]

_CODE = [
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n"
    "        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n"
    "        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1",
    "SELECT customer_id, SUM(amount) AS total\nFROM orders\nWHERE created_at >= '2024-01-01'\n"
    "GROUP BY customer_id\nHAVING SUM(amount) > 1000\nORDER BY total DESC;",
    "async function fetchJson(url) {\n  const response = await fetch(url, { headers: { Accept: 'application/json' } });\n"
    "  if (!response.ok) throw new Error(`HTTP ${response.status}`);\n  return response.json();\n}",
    "for f in *.log; do gzip -9 \"$f\"; done && find /var/log -name '*.gz' -mtime +30 -delete",
    "import numpy as np\n\ndef cosine(a, b):\n    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))",
    "#include <stdio.h>\nint main(void) {\n    for (int i = 1; i <= 15; i++)\n"
    '        printf(i % 15 == 0 ? "FizzBuzz\\n" : i % 3 == 0 ? "Fizz\\n" : i % 5 == 0 ? "Buzz\\n" : "%d\\n", i);\n}',
    "apiVersion: apps/v1\nkind: Deployment\nspec:\n  replicas: 3\n  template:\n    spec:\n      containers:\n"
    "        - name: gateway\n          livenessProbe:\n            httpGet: {path: /livez, port: 8001}",
    'fn main() {\n    let words: Vec<&str> = "the quick brown fox".split_whitespace().collect();\n'
    '    println!("{}", words.iter().rev().cloned().collect::<Vec<_>>().join(" "));\n}',
    "git rebase -i HEAD~3  # squash the last three commits into one before pushing",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n"
    "        self.data = collections.OrderedDict()\n\n    def get(self, key):\n"
    "        if key not in self.data:\n            return None\n        self.data.move_to_end(key)\n"
    "        return self.data[key]",
]

_OTHER_LANGUAGES = [
    "La photosynthèse transforme l'énergie lumineuse en énergie chimique et libère de l'oxygène.",
    "Pour réinitialiser votre mot de passe, ouvrez les paramètres puis la rubrique Sécurité.",
    "Der Vertrag von Westfalen beendete 1648 den Dreißigjährigen Krieg.",
    "Die Erstattung erfolgt innerhalb von fünf bis zehn Werktagen auf das ursprüngliche Zahlungsmittel.",
    "El café espresso se prepara haciendo pasar agua caliente a presión a través de café molido fino.",
    "La tasa de interés subió en 2022 porque los bancos centrales querían frenar la inflación.",
    "光合作用把光能转化为化学能，并释放氧气。",
    "珠穆朗玛峰海拔8849米，是世界最高峰。",
    "Фотосинтез превращает энергию света в химическую энергию.",
    "Эверест — самая высокая гора на Земле.",
    "光合成は光エネルギーを化学エネルギーに変える。",
    "パスワードを再設定するには、設定からセキュリティを開いてください。",
    "التمثيل الضوئي يحول طاقة الضوء إلى طاقة كيميائية.",
    "A fotossíntese converte energia luminosa em energia química.",
    "Il portiere ha parato un rigore all'ultimo minuto.",
    "광합성은 빛 에너지를 화학 에너지로 바꾼다.",
]

_SHORT = ["ok", "error 404", "refund", "Everest", "cache miss", "SELECT *", "bonjour", "多语言", "GPU", "TODO"]

# Two long documents (a few hundred tokens each), made of the prose above in a fixed order.
_LONG = [" ".join(_PROSE[i] for i in range(0, 20, 2)) * 2, " ".join(_PROSE[i] for i in range(19, 0, -3)) * 3]

PROBE_DOCUMENTS: tuple[str, ...] = (*_PROSE, *_CODE, *_OTHER_LANGUAGES, *_SHORT, *_LONG)

PROBE_QUERIES: tuple[str, ...] = (
    "how do plants turn sunlight into energy",
    "what ended the thirty years war",
    "I forgot my password, how do I change it?",
    "when will I get my money back after returning something",
    "how does sentence embedding pooling work",
    "how long should an espresso shot take",
    "highest mountain in the world",
    "why did mortgage payments go up",
    "where is ATP made in the cell",
    "kubernetes readiness vs liveness probe",
    "python function to find an element in a sorted list",
    "sql total spend per customer this year",
    "javascript fetch json with error handling",
    "compress old log files in bash",
    "cosine similarity numpy",
    "rust reverse the words of a string",
    "least recently used cache implementation",
    "redis eviction policy when memory is full",
    "comment réinitialiser mon mot de passe",
    "Rückerstattung Dauer",
    "世界最高的山",
    "как растения используют свет",
    "coral bleaching ocean temperature",
    "quarterly earnings subscriptions growth",
)


def probe_texts() -> list[str]:
    """Queries first, then documents: the order the gate's reference vectors are stored in."""
    return [*PROBE_QUERIES, *PROBE_DOCUMENTS]


def long_probe_texts(min_chars: int) -> list[str]:
    """Two long inputs for the gate's long-input check, each at least ``min_chars`` characters.

    Every document of the set (prose, code, nine languages) joined in order, and in reverse order,
    repeated until long enough: the gate cuts them to a token count and embeds each *alone*, as
    the micro-batcher serves a long input on the CPU, so the start sees the long-input path
    (README "int8 on CPU", "Long inputs").
    """
    texts = []
    for documents in (PROBE_DOCUMENTS, PROBE_DOCUMENTS[::-1]):
        joined = "\n\n".join(documents)
        texts.append("\n\n".join([joined] * max(1, -(-min_chars // len(joined)))))
    return texts
