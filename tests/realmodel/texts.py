"""The texts the real-model checks use: licence texts every Debian system ships, and one
hand-written string that exercises the tokenizer's edge cases."""
import hashlib

GPL3 = "/usr/share/common-licenses/GPL-3"
GFDL13 = "/usr/share/common-licenses/GFDL-1.3"
APACHE2 = "/usr/share/common-licenses/Apache-2.0"

# Contractions (and their upper-case forms, which the pattern does not treat as contractions),
# digit runs and decimals, whitespace runs, tabs, blank lines, non-ASCII letters and numbers
# (Nl, No, Arabic-Indic digits), combining marks, CJK, emoji, punctuation runs, control-token
# text that must stay literal unless special tokens are parsed.
EDGE = ("It's we're they've I'm you'll he'd don't IT'S WE'RE 'tis ''quoted'' rock'n'roll\n"
        "Version 3, 29 June 2007; pi=3.14159, 1,000,000 and 12345678901234567890 x2 2x\n"
        "  two  spaces   three\tthen\t\ttabs   \n\n\nblank lines above  \n \n"
        "caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m \u0395\u03bb\u03bb\u03ac\u03b4\u03b1 "
        "\u041c\u043e\u0441\u043a\u0432\u0430 e\u0301 \u4e2d\u6587\u5b57 \u65e5\u672c\u8a9e "
        "\U0001F642\U0001F680 \u00bd \u2167 \u0663\u0664 \u00b2\n"
        "!!! ... ?!? --- ((nested)) [x] {y} <|im_start|>user\nhi<|im_end|> </s> @#$%^&* ~`|\\ end")

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat does the GPL say about warranties?<|im_end|>\n"
        "<|im_start|>assistant\n")


def read_text(path):
    with open(path, "rb") as f:
        data = f.read()
    return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
