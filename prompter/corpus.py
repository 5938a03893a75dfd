"""The default prompt corpus: a few hundred varied prompts the project writes itself, so a fresh
service answers /prompts without any download. Subjects across common topics are paired with styles
and finishing details in a fixed rotation, so the corpus is the same on every machine."""

from __future__ import annotations

SUBJECTS = [
    # landscapes and places
    "a misty mountain valley at sunrise",
    "a quiet beach with turquoise water and palm trees",
    "a dense pine forest after the rain",
    "a desert canyon under a starry night sky",
    "a frozen lake surrounded by snowy peaks",
    "rolling green hills with a winding river",
    "a waterfall in a tropical jungle",
    "a field of sunflowers under a summer storm",
    # cities and architecture
    "a futuristic city skyline with flying cars",
    "a narrow cobblestone street in an old european town",
    "a gothic cathedral interior with stained glass windows",
    "a cozy japanese tea house in a garden",
    "an abandoned factory overgrown with plants",
    "a lighthouse on a rocky cliff during a storm",
    "a floating castle above the clouds",
    "a busy night market lit by paper lanterns",
    # people and characters
    "a portrait of an old fisherman with a weathered face",
    "a young woman reading a book by the window",
    "an astronaut floating above the earth",
    "a samurai standing in falling cherry blossoms",
    "a cyberpunk hacker in a neon-lit room",
    "an anime girl with silver hair and a school uniform",
    "an anime boy holding a glowing sword",
    "a wizard casting a spell in an ancient library",
    "a knight in ornate armor on horseback",
    "a street musician playing violin in the rain",
    # animals and creatures
    "a red fox in a snowy forest",
    "a majestic lion resting on a rock at sunset",
    "an owl perched on a branch under the full moon",
    "a colorful parrot in the rainforest canopy",
    "a humpback whale breaching the ocean surface",
    "a dragon curled around a mountain peak",
    "a cute corgi puppy wearing a tiny hat",
    "a giant koi fish swimming through the sky",
    # objects, food and still life
    "a bowl of ramen with steam rising",
    "a still life of fruit and flowers on a wooden table",
    "a vintage camera on a desk beside old photographs",
    "a steaming cup of coffee on a rainy morning",
    "a classic red sports car on a coastal road",
    "a steam locomotive crossing a stone bridge",
    # space and fantasy
    "a nebula with swirling purple and blue clouds",
    "an alien planet with two moons and strange plants",
    "a spaceship docking at an orbital station",
    "an enchanted forest with glowing mushrooms",
    "a mermaid sitting on a rock by the sea",
]

STYLES = [
    "oil painting, impressionist brush strokes",
    "watercolor illustration, soft pastel colors",
    "photorealistic, 8k, sharp focus, cinematic lighting",
    "anime style, studio ghibli inspired, vibrant colors",
    "digital art, concept art, trending on artstation",
    "pixel art, 16-bit retro video game",
    "pencil sketch, detailed line art, black and white",
    "3d render, octane render, unreal engine 5",
    "ukiyo-e woodblock print",
    "art nouveau poster, ornate decorative borders",
    "low poly, isometric, minimalist",
    "surrealism in the style of a dream",
    "cyberpunk style, neon colors, rainy night",
    "vintage film photograph, grainy, 1970s",
    "charcoal drawing, dramatic shadows",
    "stained glass style, bold outlines",
]

DETAILS = [
    "highly detailed",
    "golden hour light",
    "dramatic composition",
    "muted color palette",
    "volumetric fog",
    "wide angle view",
    "close-up, shallow depth of field",
    "masterpiece, award winning",
]

STYLES_PER_SUBJECT = 7


def default_prompts() -> list[str]:
    """45 subjects x 7 styles = 315 distinct prompts, styles and details in rotation."""
    prompts = []
    for i, subject in enumerate(SUBJECTS):
        for j in range(STYLES_PER_SUBJECT):
            style = STYLES[(i * 3 + j) % len(STYLES)]
            detail = DETAILS[(i + j) % len(DETAILS)]
            prompts.append(f"{subject}, {style}, {detail}")
    return prompts
