"""Folds that fit ``ssl_split.json``: fold ``all`` and numbered folds never train on ``val`` cases, and a dataset
too small for nnU-Net's 5-fold split stops with one line saying what to do."""

from __future__ import annotations

import json
import os

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

MIN_CASES_FOR_CROSS_VALIDATION = 5


class FoldsFromSplitFile:
    """Mixin: folds that fit ``ssl_split.json`` (the copy ``nnssl_plan_and_preprocess`` puts next to the plans).

    - a numbered fold without ``splits_final.json`` and fewer than 5 labeled cases stops before training with one
      line saying what to do (nnU-Net's 5-fold split would fail inside scikit-learn);
    - ``val`` cases of the split (preprocessed into the configuration folder for fold 0's validation) are never
      training cases: fold ``all`` leaves them out, and without ``splits_final.json`` (which
      ``nnssl_plan_and_preprocess`` writes for them) a numbered fold stops instead of cross-validating over them.

    ``SystemExit`` with a message makes ``nnUNetv2_train`` print that message and exit 1, without a traceback.
    """

    def _ssl_val_ids(self) -> set[str]:
        path = os.path.join(self.preprocessed_dataset_folder_base, "ssl_split.json")
        try:
            val = json.loads(open(path, encoding="utf-8").read()).get("val", [])
        except (OSError, ValueError, AttributeError):
            return set()
        return set(val) if isinstance(val, list) else set()

    def do_split(self):
        val_ids = self._ssl_val_ids()
        if self.fold == "all":
            tr_keys, _ = super().do_split()
            if val_ids:
                tr_keys = [k for k in tr_keys if k not in val_ids]
                self.print_to_log_file(f"fold 'all': the {len(val_ids)} 'val' cases of ssl_split.json are left out "
                                       f"of training; training on {len(tr_keys)} labeled cases")
            return tr_keys, tr_keys
        splits_file = os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if not os.path.isfile(splits_file):
            if self.dataset_class is None:
                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            keys = [k for k in self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
                    if k not in val_ids]
            name = self.plans_manager.dataset_name
            if val_ids:
                dataset_id = name.split("_")[0][len("Dataset"):].lstrip("0") or "0"
                raise SystemExit(f"{splits_file} is missing but ssl_split.json has 'val' cases: run "
                                 f"nnssl_plan_and_preprocess -d {dataset_id}, which writes it (fold 0 = train on the "
                                 f"labeled cases, validate on 'val')")
            if len(keys) < MIN_CASES_FOR_CROSS_VALIDATION:
                raise SystemExit(
                    f"fold {self.fold}: {name} has only {len(keys)} labeled case(s) and nnU-Net's 5-fold "
                    f"cross-validation needs at least {MIN_CASES_FOR_CROSS_VALIDATION}. Train on all labeled cases "
                    f"with fold 'all' (nnUNetv2_train {name} {self.configuration_name} all -tr "
                    f"{type(self).__name__}), or write your own folds to {splits_file} "
                    f"([{{\"train\": [...], \"val\": [...]}}, ...]), or add a 'val' list to ssl_split.json "
                    f"and rerun nnssl_plan_and_preprocess")
        return super().do_split()


