from fastlayer.cli import main

raise SystemExit(main())
