from covid_monai.cli import main

raise SystemExit(main())
