"""File formats, one module per tool that reads psoft_vision's files: the native adapter file (``native``, with
``header`` and ``fingerprint``), LoRA factors (``lora_factors``), PEFT's adapter folder (``peft_adapter``), kohya-ss
LoRA files (``kohya_lora``) and diffusers' LoRA files (``diffusers_lora``); ``names`` spells every file name and key
scheme once."""
