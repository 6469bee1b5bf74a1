"""Official class-name lists of the label-map datasets (index = label value after the shift
described at each list).

- ADE20K (SceneParsing ``ADEChallengeData2016``): annotation value v in 1..150 is class
  ``ADE20K_CLASSES[v - 1]``; 0 is "other" and ignored (the first name of each objectInfo150 row).
- COCO-Stuff 164k (``stuffthingmaps_trainval2017``): value v in 0..181 is ``COCOSTUFF_CLASSES[v]``
  (COCO category id v + 1; the 11 ids COCO never annotates keep their names), 255 = unlabeled.
  Names with a hyphen ("wall-other", "floor-wood", ...) are ignored as training targets, as LISA does.
"""

ADE20K_CLASSES = tuple((
    'wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|sidewalk|person|'
    'earth|door|table|mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|'
    'mirror|rug|field|armchair|seat|fence|desk|rock|wardrobe|lamp|bathtub|railing|cushion|base|'
    'box|column|signboard|chest of drawers|counter|sand|sink|skyscraper|fireplace|refrigerator|'
    'grandstand|path|stairs|runway|case|pool table|pillow|screen door|stairway|river|bridge|'
    'bookcase|blind|coffee table|toilet|flower|book|hill|bench|countertop|stove|palm|'
    'kitchen island|computer|swivel chair|boat|bar|arcade machine|hovel|bus|towel|light|truck|'
    'tower|chandelier|awning|streetlight|booth|television receiver|airplane|dirt track|apparel|'
    'pole|land|bannister|escalator|ottoman|bottle|buffet|poster|stage|van|ship|fountain|'
    'conveyer belt|canopy|washer|plaything|swimming pool|stool|barrel|basket|waterfall|tent|bag|'
    'minibike|cradle|oven|ball|food|step|tank|trade name|microwave|pot|animal|bicycle|lake|'
    'dishwasher|screen|blanket|sculpture|hood|sconce|vase|traffic light|tray|ashcan|fan|pier|'
    'crt screen|plate|monitor|bulletin board|shower|radiator|glass|clock|flag'
).split("|"))

COCOSTUFF_CLASSES = tuple((
    'person|bicycle|car|motorcycle|airplane|bus|train|truck|boat|traffic light|fire hydrant|'
    'street sign|stop sign|parking meter|bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|'
    'giraffe|hat|backpack|umbrella|shoe|eye glasses|handbag|tie|suitcase|frisbee|skis|snowboard|'
    'sports ball|kite|baseball bat|baseball glove|skateboard|surfboard|tennis racket|bottle|'
    'plate|wine glass|cup|fork|knife|spoon|bowl|banana|apple|sandwich|orange|broccoli|carrot|'
    'hot dog|pizza|donut|cake|chair|couch|potted plant|bed|mirror|dining table|window|desk|'
    'toilet|door|tv|laptop|mouse|remote|keyboard|cell phone|microwave|oven|toaster|sink|'
    'refrigerator|blender|book|clock|vase|scissors|teddy bear|hair drier|toothbrush|hair brush|'
    'banner|blanket|branch|bridge|building-other|bush|cabinet|cage|cardboard|carpet|'
    'ceiling-other|ceiling-tile|cloth|clothes|clouds|counter|cupboard|curtain|desk-stuff|dirt|'
    'door-stuff|fence|floor-marble|floor-other|floor-stone|floor-tile|floor-wood|flower|fog|'
    'food-other|fruit|furniture-other|grass|gravel|ground-other|hill|house|leaves|light|mat|'
    'metal|mirror-stuff|moss|mountain|mud|napkin|net|paper|pavement|pillow|plant-other|plastic|'
    'platform|playingfield|railing|railroad|river|road|rock|roof|rug|salad|sand|sea|shelf|sky|'
    'skyscraper|snow|solid-other|stairs|stone|straw|structural-other|table|tent|textile-other|'
    'towel|tree|vegetable|wall-brick|wall-concrete|wall-other|wall-panel|wall-stone|wall-tile|'
    'wall-wood|water-other|waterdrops|window-blind|window-other|wood'
).split("|"))

assert len(ADE20K_CLASSES) == 150 and len(COCOSTUFF_CLASSES) == 182
