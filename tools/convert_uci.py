"""Convert the raw UCI files into the Parquet copies shipped in mlops_ray/data/builtin/.

Developer tool, run once when the shipped copies change (never at run time):
    python tools/convert_uci.py ../shared/datasets
Adult keeps the UCI train/test origin in column `uci_split`; German Credit gains the derived
sensitive attributes `sex` (from attribute 9) and `age_group` (age >= 25).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "mlops_ray" / "data" / "builtin"
ADULT_COLS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
              "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
              "hours_per_week", "native_country", "income"]
GERMAN_COLS = ["checking_status", "duration_months", "credit_history", "purpose", "credit_amount",
               "savings", "employment_since", "installment_rate", "personal_status_sex",
               "other_debtors", "residence_since", "property", "age", "other_installment_plans",
               "housing", "existing_credits", "job", "num_dependents", "telephone", "foreign_worker",
               "credit_risk"]


def adult(src: Path) -> pd.DataFrame:
    parts = []
    for name, skip in (("adult.data", 0), ("adult.test", 1)):
        df = pd.read_csv(src / "adult" / name, header=None, names=ADULT_COLS, skiprows=skip,
                         sep=",", skipinitialspace=True, na_values=["?"])
        df = df.dropna(subset=["income"])
        df["uci_split"] = "train" if name == "adult.data" else "test"
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    df["income"] = df["income"].str.rstrip(".").map({"<=50K": 0, ">50K": 1}).astype("int8")
    for c in ["age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week"]:
        df[c] = df[c].astype("float64")
    return df


def german(src: Path) -> pd.DataFrame:
    df = pd.read_csv(src / "german" / "german.data", header=None, names=GERMAN_COLS, sep=" ")
    df["good_credit"] = (df.pop("credit_risk") == 1).astype("int8")  # 1 = good risk (favourable)
    df["sex"] = df["personal_status_sex"].map(
        {"A91": "male", "A92": "female", "A93": "male", "A94": "male", "A95": "female"})
    df["age_group"] = (df["age"] >= 25).map({True: "25_and_over", False: "under_25"})
    for c in ["duration_months", "credit_amount", "installment_rate", "residence_since", "age",
              "existing_credits", "num_dependents"]:
        df[c] = df[c].astype("float64")
    return df


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn, label in (("adult", adult, "income"), ("german", german, "good_credit")):
        df = fn(src)
        df.to_parquet(OUT / f"{name}.parquet", index=False)
        print(name, df.shape, "positive rate", round(float(df[label].mean()), 3))
