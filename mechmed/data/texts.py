"""Small prompt sets shipped with mechmed, for checking that SAEs reconstruct a model's activations.

Two plain-text sets, written for mechmed (no external source):

- ``medical``: radiology-report and clinical sentences (chest imaging mostly, some general
  medicine), the register a medical VLM is fine-tuned on.
- ``general``: everyday English sentences on unrelated topics, the register off-the-shelf SAEs
  (Gemma Scope) were trained on.

``mechmed sae-check --texts medical,general`` reads these by name through :func:`text_set`;
``images`` (image + question prompts) comes from a source that ships images
(:data:`mechmed.sources.Source.image_prompts`), not from here.
"""

from __future__ import annotations

from mechmed.errors import MechmedError

MEDICAL: tuple[str, ...] = (
    "Frontal chest radiograph shows a small left pleural effusion with blunting of the costophrenic angle.",
    "The heart is enlarged, with a cardiothoracic ratio of about 0.6.",
    "There is no pneumothorax and both lungs are fully expanded.",
    "Patchy consolidation in the right lower lobe is consistent with pneumonia.",
    "The lungs are clear and there is no focal airspace opacity.",
    "Bilateral perihilar haziness and Kerley B lines suggest interstitial pulmonary edema.",
    "A well-circumscribed nodule measuring 8 millimetres projects over the left upper lobe.",
    "The endotracheal tube tip lies 4 centimetres above the carina.",
    "A right internal jugular central venous catheter terminates in the superior vena cava.",
    "The mediastinal contours are within normal limits.",
    "There is mild thoracic spine degenerative change without acute fracture.",
    "Compared with the prior study, the right pleural effusion has decreased in size.",
    "The cardiac silhouette is normal in size and the pulmonary vasculature is normal.",
    "Linear atelectasis is seen at the left lung base.",
    "A large right pneumothorax with mediastinal shift raises concern for tension physiology.",
    "The costophrenic angles are sharp bilaterally.",
    "There is a moderate hiatal hernia behind the heart.",
    "Multiple healed left rib fractures are noted.",
    "The hila are not enlarged and there is no lymphadenopathy.",
    "Diffuse reticular opacities are seen in both lower zones, suggesting fibrosis.",
    "The nasogastric tube passes below the diaphragm with its tip in the stomach.",
    "Hyperinflated lungs with flattened hemidiaphragms are consistent with emphysema.",
    "No acute cardiopulmonary abnormality is identified.",
    "A small amount of fluid tracks along the right minor fissure.",
    "The aortic knob is calcified and the aorta is tortuous.",
    "Subcutaneous emphysema is present along the right chest wall.",
    "The patient is rotated, which limits assessment of the mediastinum.",
    "A pacemaker is present with leads in the right atrium and right ventricle.",
    "There is elevation of the right hemidiaphragm.",
    "A cavitating mass in the right upper lobe should be further evaluated with computed tomography.",
    "Blunting of the left costophrenic angle may represent a small effusion or pleural thickening.",
    "Air bronchograms within the opacity favour consolidation over a mass.",
    "The trachea is midline and the visualised bones are unremarkable.",
    "Interval removal of the chest tube with no residual pneumothorax.",
    "Increased interstitial markings are most likely due to fluid overload.",
    "The patient was admitted with shortness of breath and a productive cough.",
    "Auscultation revealed crackles at both lung bases.",
    "Oxygen saturation was 91 percent on room air.",
    "The white cell count was raised and the C-reactive protein was elevated.",
    "Empirical antibiotics were started for community-acquired pneumonia.",
    "An echocardiogram showed a reduced ejection fraction of 35 percent.",
    "Furosemide was given and the patient's breathlessness improved overnight.",
    "She has a history of hypertension, type 2 diabetes and chronic kidney disease.",
    "The electrocardiogram showed sinus rhythm with no acute ischaemic changes.",
    "A computed tomography pulmonary angiogram excluded pulmonary embolism.",
    "The patient reported pleuritic chest pain that worsened on deep inspiration.",
    "On examination there was reduced air entry and dullness to percussion on the left.",
    "Thoracentesis drained 800 millilitres of straw-coloured fluid.",
    "Pleural fluid analysis was consistent with a transudate.",
    "Smoking history is 30 pack-years and he continues to smoke.",
    "Follow-up chest radiography in six weeks is recommended to confirm resolution.",
    "The nodule has been stable for two years, which favours a benign cause.",
    "Spirometry showed an obstructive pattern that improved after a bronchodilator.",
    "There were no signs of heart failure on clinical examination.",
    "The patient was discharged home on oral antibiotics with a review in clinic.",
    "Blood cultures were negative after 48 hours.",
    "Bibasal crepitations and raised jugular venous pressure suggested fluid overload.",
    "The child presented with fever, tachypnoea and intercostal recession.",
    "Portable anteroposterior film taken in the intensive care unit.",
    "Lung volumes are low, crowding the bronchovascular markings.",
    "A left lower lobe collapse is seen as a triangular density behind the heart.",
    "The right heart border is obscured, suggesting right middle lobe disease.",
    "Calcified granulomas are scattered through both lungs.",
    "There is widening of the superior mediastinum that needs clinical correlation.",
    "The findings were discussed with the referring clinician by telephone.",
    "Cardiomegaly with upper lobe venous diversion indicates congestive heart failure.",
    "Pneumoperitoneum is seen as free air beneath the right hemidiaphragm.",
    "Small bilateral pleural effusions have developed since yesterday.",
    "A tracheostomy tube is in a satisfactory position.",
    "The appearance is unchanged from the radiograph obtained last month.",
)

GENERAL: tuple[str, ...] = (
    "The train to the coast leaves every hour from the main station.",
    "She planted tomatoes and basil in the garden behind the house.",
    "Our team won the match after a penalty in the last minute.",
    "The library is closed on Sundays and public holidays.",
    "He spent the weekend repairing the old wooden fence.",
    "A light rain fell over the city for most of the afternoon.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Please remember to switch off the lights when you leave the room.",
    "The museum has a new exhibition about ancient ships.",
    "They watched the sunset from the top of the hill.",
    "The meeting was moved to Thursday because of the holiday.",
    "My brother is learning to play the guitar.",
    "The bakery on the corner sells fresh bread every morning.",
    "A flock of geese flew south over the lake.",
    "The new bridge will shorten the journey by twenty minutes.",
    "We need to buy milk, coffee and apples on the way home.",
    "The children built a sandcastle near the water.",
    "Her first novel was translated into twelve languages.",
    "The river flooded the lower fields after the storm.",
    "He forgot his umbrella and got soaked on the way to work.",
    "The company announced that profits rose by five percent this year.",
    "A good night's sleep makes it easier to concentrate.",
    "The orchestra played a symphony by Beethoven.",
    "Tourists queued for hours to see the famous painting.",
    "The cat slept in a patch of sunlight on the carpet.",
    "The road through the mountains is closed in winter.",
    "Students must hand in their essays by Friday at noon.",
    "The farmer sold his vegetables at the weekly market.",
    "A new café has opened next to the cinema.",
    "The plane landed safely despite strong crosswinds.",
    "He keeps his bicycle in the shed behind the garage.",
    "The election results will be announced tomorrow morning.",
    "Fresh snow covered the village overnight.",
    "The teacher explained the rules of the game to the class.",
    "She called her grandmother every Sunday evening.",
    "The software update fixed several bugs and improved battery life.",
    "The old lighthouse still guides ships into the harbour.",
    "We walked along the beach and collected shells.",
    "The price of petrol has gone up again this month.",
    "A small dog barked at the postman from behind the gate.",
    "The chef added a little lemon juice to the sauce.",
    "The concert was cancelled because the singer was ill.",
    "They painted the kitchen a pale shade of yellow.",
    "The hikers reached the summit just before noon.",
    "This street gets very busy during the morning rush hour.",
    "The shop offers a discount to students and pensioners.",
    "An owl hooted somewhere in the dark woods.",
    "The city council voted to build a new swimming pool.",
    "He read the newspaper while waiting for the bus.",
    "The football season starts again in August.",
    "The garden was full of bees and butterflies.",
    "We had pancakes with maple syrup for breakfast.",
    "The documentary followed a family of elephants across the savanna.",
    "Her phone battery died in the middle of the call.",
    "The ferry crossing took about ninety minutes.",
    "A strong wind blew the leaves across the yard.",
    "The students visited a factory that makes chocolate.",
    "He finally finished the puzzle after three evenings.",
    "The castle on the hill was built in the twelfth century.",
    "Everyone clapped when the band came back on stage.",
    "The river is wide and slow as it reaches the sea.",
    "She borrowed three books about astronomy from the library.",
    "The neighbours are having a party on Saturday night.",
    "The price of the tickets includes a guided tour.",
    "A rainbow appeared after the shower had passed.",
    "The printer on the second floor is out of paper again.",
    "They moved to a bigger flat closer to the park.",
    "The market square is decorated with lights in December.",
    "He likes to go fishing early in the morning.",
    "The film was longer than we expected but very good.",
)

TEXT_SETS: dict[str, tuple[str, ...]] = {"medical": MEDICAL, "general": GENERAL}
"""The shipped plain-text sets, by name."""


def text_set(name: str) -> list[str]:
    """The shipped text set ``name`` (``medical`` or ``general``) as a list of sentences."""
    try:
        return list(TEXT_SETS[name])
    except KeyError:
        raise MechmedError(
            f"text set {name!r}: unknown; choose from {', '.join(TEXT_SETS)} (or images)"
        ) from None
