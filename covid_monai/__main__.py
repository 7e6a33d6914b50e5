from covid_monai.cli import console_main

raise SystemExit(console_main())
