"""Extra training words for the sorting task: 4159 lower-case entries of the SmolLM2 vocabulary.

Every entry is a single token with a leading space in SmolLM2's tokenizer whose capitalised form is one
too (so mostly real words, some word pieces). They are for training only: none is an eval word. With a
vocabulary this large the expert has to order words by their letters; with ~300 it learned the orders of
the words it had seen instead and got unseen ones wrong. Generated once with:

    [w[1:] for w in vocab if w.startswith("Ġ") and re.fullmatch(r"[a-z]{4,9}", w[1:])
     and "Ġ" + w[1:].capitalize() in vocab]   # minus the eval words and the hand-written train words
"""

EXTRA_TRAIN_WORDS = """
    abbey ability abnormal about above absol absolute abstract abuse academ academia academic academy
    accel accept access accessed accom accommod according account accounts accuracy accurate achie
    achieving acid acids acknow across acting action actions active activism activity acts actual
    actually acute adam adapt adapting adaptive added addiction adding addition address aden adjust
    admin administ adolesc adopting adoption adult adults advance advanced advances advent adventure
    advert advice advisor advisory advoc advocacy advocate advocates aerospace affairs affect affirm
    afric after afterward again against agencies agency agenda agent agents ages aging agree agreement
    agricult aids aircraft airlines alcohol alert algebra algorithm alien alle alleg allergies allergy
    alliance allied allies allow allowing almost along alongside alpha alphabet alpine already also
    alter altern although aluminum always amazing amen amend amendment americ america american amid
    amidst ammon among amongst amount amph amphib ampl anal analog analy analysis analytics analyze
    analyzing anat anatomy ancest anch ancient angel angels anger angle anim animal animals animation
    annals anne annex annot annual anonymous another answer answers anth anthrop anti antib anticip
    antig antim antioxid antiqu anxiety anyone anything anyway apart apost apostle apostles appeal
    appeals appendix appl apples applic applied apply applying appro approach appropri approved apps
    aquarium aquatic arab arbit arch archae arche architect archive archived archives arctic area areas
    aren args argument arguments arist armed arms army around arrange array arsen arthritis article
    articles artillery artist artistic artists arts aside asked asking aspects assemb assembly assert
    assess assessing asset assets assign assist assistant associ associate assume assuming aster asthma
    astron astronomy astroph athe athletes atlas atmosp atomic attach attack attacks attempt attend
    attention attitudes attorney attribute audience audio augmented aunt aust austral authent authentic
    author authority authors autism auto autobi autom automated automatic auton autumn available avenue
    average aviation avoid avoiding award awards awareness away axis babies bachelor back bacon bacter
    bacteria bacterial bake baker baking balance balanced balancing bald ball band bang banking banks
    bapt baptism barb barc bark barn barrier barriers base baseball based basic basically basics basil
    basin basis bass bast batch bath batt battalion battery battle battles bead beam beans bear bears
    beat beaut beautiful beauty because become becoming beef beer bees beet before begin beginners
    beginning behav behavior behaviour behind being belief beliefs believe below bend bene benef benefit
    benefits bent benz bere berry besides best beta better between beyond bias bible bibli biblical bill
    billion binary biography biology biom bios bipolar bird birds birth birthday bishop bitcoin black
    blacks blank blend blessed blind block blocks blog blood bloom blow blue blueprint blues board
    boards bodies body bold bomb bond bonds bone bones books boolean boost booth border borders born
    borne borough botanical botany both bots bott bottom bound boundary boys brain brand brass break
    breakfast breaking breast breat breath breathing breed breeding brew brid bridges bridging brief
    brig brigade bright bring bringing brit broad broken brom bron bronze brother brothers brow brown
    browning browse browser brut buck budd budget buff buffalo build builder building buildings built
    bull bullet bulletin bullying bund bunny bureau burg burn burning burns business butterfly buying
    buzz cable cache calcium calcul calculate calculus calendar caliph call callable called camera camp
    campaign campus canal cancer cand cannabis canon cant capacity capital caps capt captain capture
    carbon cardi cardiac cardinal cards care career careers carefully caring carn carp carpenter carrier
    carry cars cart casc case cases cash cass cast catal catalog catch cate category cater cath
    cathedral cats cattle cause causes caval cavalry cave cedar cele celebr celebrate cell cells
    cellular cemetery census cent center centers central centre centuries century ceram cere ceremon
    cert certain certainly certified cerv chain chairman chal chall challenge cham chamber chambers
    champ champion champions chances chang change changes changing channel chap chapel chapter chapters
    char character charg charge charity chart charter chase chat check checking checklist chef chem
    chemical chemicals chemistry cher chess chest chick chicken chief chiefs childhood children chim
    chin china chip chir chlor chocolate choice choices choose choosing christ chrom chron chronic
    chronicle chrys chuck churches cinema circ circle circuit circular citation cite cited cities citiz
    citizen citizens city civic civil claim claims clan clar class classes classic classical classics
    classroom clause clean cleaning clear clearly clerk click client clim climate clin clinic clinical
    clos close closed clothing clouds club cluster coach coalition coastal cock coconut code codes
    coding coff coffee cognition cognitive coin cold coll collab collect college colleges colon colonel
    colonial colonies colony color colored coloring colors colour column comb combat combine combined
    combining come comedy comfort comic comics coming comm command commander comment comments commerce
    commit committee commod common commonly commons commun communion communism communist community comp
    compact compan companies companion company compar compare compared comparing compet compl complete
    complex component compos composite compost compound comprom comput compute computer computers
    computing conc concent concept concepts concern concerns concrete cond condition conduct cone conf
    confed config confirm conflict conflicts cong congress conn connect connected conquest cons
    conscious consent conserv consider consol const constant construct consult consumer consumers
    consuming cont contact container contains content contents context contin continent continue
    continued contract contrary contrast contribut control controls conv conver convers convert cook
    cooking cool cooling cooper coord cope coping copy copyright coral cord core cork corner coron
    corpor corporate corps corpus correct cort cosm cosmic cost costs cott cotton cough could council
    counsel count counter counties counting countries country county cour courage course courses court
    courtesy courts covenant cover coverage craft crafting crafts cran crane crater craw crazy cream
    creat create created creates creating creation creative creator cred credit creed creek crescent
    crest crew crick crim crime crimes criminal cris crisis crit criteria critical criticism critics
    critique croc crop crops cross crossing crow crown cruc crus crusade crypt crystal cube cuisine
    culinary cult cultural culture cultures cure curiosity curious currency current currently curve cust
    custom customer customers customs cutting cyber cycl cycle daily dairy damage dance dangerous dark
    dart dash data database dataset date dating dawn days dead deaf deal dean dear death debate debates
    debt decide decimal decision decisions decl decline decre decreased deep deer default defaults
    defence defense deficit define defining degree deleg delete delicious delivery delta delving demand
    dementia democr democracy democrat demonstr dense density dent dental dentistry depending depth
    deputy dermat desc describe design designed designer designers designing designs desktop despite
    dest detailed details detection determ determine develop developed developer device devices devil
    diabetes diagn diagnosis diagram dial dialogue diam diamond dias diaspora dict diction diet dietary
    diff different difficult digest digestive digital dinosaur dipl diplom direct direction directive
    director directors directory disaster disc discourse discover discovery discuss dise disease
    diseases disk disorder disorders dispar display disput diss dist distance distingu district
    districts dive diver divers diverse diversity divid divide divine division django dock docker doct
    doctors doctrine document documents does doesn dogs doing doll dollar dolph domain dome domestic
    domin dominion done dors double down download draft drag dragon drain drama draw drawing dream
    dreams drew drink drinking drive driver drivers driving drop drought drug drugs dual duck duke
    duration during dust duty dynam dynamic dynamics dynasty each earl earlier early earn east eastern
    easy eating echo ecology econom economic economics economist economy ecosystem edge edit edited
    editing edition editor editorial editors educ educate education educator educators effect effective
    effects efficient efforts eggs eight eighth either elastic elder elders elect election elections
    electoral electric electro electron element elements elephant elev elim elli else email embassy
    embed embrace embracing embry emer emergence emergency emerging emissions emotion emotional emotions
    empathy emperor emphas emphasis emphasize empire employ employee employees employers employing
    empower empty enable encourage encyclop energy engage engaging engineer engineers english enhance
    enhanced enhancing enjoy enough ensure ensuring enter entity entom entry enum epic epid epidem
    episode equal equality equally equation equations equipment equity eras error errors essay essays
    essential estab establish estate estimates ethical ethics ethn ethnic euph euro europe eval evaluate
    evangel even evening event events ever every everybody everyday everyone evidence evil evol
    evolution exactly exam examine examining example examples excel excell excellent except exception
    excess excessive exchange excited excitedly exciting exec execution executive exerc exercise
    exercises exhib existing exit exodus expand expanding expansion expect exped exper expert experts
    expl explain explore explorer exploring export exposure express extended extension extensive
    external extra extract extreme eyes fabric face facebook faced facial facilit facility facing fact
    factor factors factory facts faculty failure fair fairy faith fake fall falls false fame familiar
    families family famous fant fantasy farmers farming farms fasc fashion fast fate father fathers
    fatigue fatty fault fear feast feature features federal feed feedback feeding feel feeling feelings
    feet fellow fellows female females feminist fertil fertility fest festival fetch fever fewer fiber
    fiction fields fifth fifty fight fighter fighting figure figures file files fill film films filter
    filters final finally finance financial find finding findings fine finger finish fire firm first
    firstly fiscal fish fisher fisheries fishing fitness five fixed flag flags flash flask flat flav
    fleet flex flight flint flip float flood flor flora flow flowers fluid flying focus focusing fold
    folk folklore follow following font food foods foot football force forces fore foreign forensic
    forestry forests form formal format formation former forms formula fort fortune forty forum forward
    fossil foster fostering found founded founder founding fountain four fourth fract frag fram frame
    framework franc frank free freed freedom french frequency frequent fres fresh fried friend friendly
    friends from front frontier frontiers frozen fruit fruits fuel full fuller function functions fund
    funding funds fung furn further fusion future futures gain gall gallery gamb game games gamma gang
    gard gardening gardens gast gastro gate gates gateway gather gathering gear gender gene genealog
    genealogy general generally generate generated generator generic genes genesis genetic genetics
    genocide genome genomics gent gentle gently geography geology geometry germ german gest gets getting
    ghost giant gift gill ginger girl girls give given giving glac glad glob global globe glory gloss
    glossary glucose glue goal goals goddess gods goes going golden golf good goods google goose gospel
    gothic govern governor governors grab grace grad grade grades gradient gradu gradually graduate
    grain gram grammar gran grand grant grants graph graphic graphics gras grat graves gravity gray
    great greater green greens gren grey grid grim gross ground group groups grow growing growth guard
    guardian guards guest guid guidance guide guided guideline guides guild guinea gulf gust habit
    habitat habits hack hair half hall hamlet hamm hand handbook handle handling hands hang happ
    happiness happy harbour hard hardware hardy hare harm harmon harmony harness harv harvest hash hass
    hast have haven having hawk hazard hazardous hazards head heads healing health healthy hear hearing
    heart heat heating heaven heavy height heights helic hell hello helm help helping helps hence
    hepatitis herald herb herbal herbs here heritage hern hero heroes hers heter hidden hide hier high
    higher highlands highlight highly highway hills himself hind hipp hist histor historian historic
    histories history hockey hold holding hole holiday holistic hollow holy home homeland homes homework
    honor hood hook hope hopefully horiz horizon horizons horm hormone horn hors horses hort hosp
    hospitals host hour hours household houses housing however http hull human humanity humans humor
    hundred hundreds hung hunger hunt hunter hunting hurricane hybrid hydro hydrogen hygiene hyper icon
    idea ideal ideally ideas ident identify identity illness illust imag image images imagine imaging
    immig immun immune impact impacts imperial implement import important importing impro improve
    improved improving incident include included includes including inclusion inclusive income incorpor
    incre increase increased increases incred indeed index india indoor indust industry inequ infant
    infantry infants infect infection inflamm inflation influ influence influenza info inform infrared
    inher init initial initially injection injuries injury inner innov input inquiry insect insects
    insert inside insight insights insp inspect inspector inspired inst install instance instant instead
    institute instru instruct insulin insurance intake integ integer integrity intellig intensive inter
    interest interface interior intern internal internet interpre interpret interview into intra
    intrigued introdu introduce invalid invasion invasive invent inventory invest investig investing
    invite invol involved iris islands isolation issue issues ital item items iter jack java jazz jewel
    jobs john join joint jour journal journals journey json judge judges judgment judicial juice jump
    junction junior juris just justice juvenile kale keep keeping keyboard keys kick kidney kids kill
    kind kingdom kings kiss kitchen knee knights know knowing knowledge known label labor labour labs
    lack lact ladies lady lakes lamb land landing landmark lands landscape lane lang language languages
    larg large larger laser last lastly late later latter launch laure laws layer layers layout lead
    leader leaders leading league leak leakage lean lear learn learned learners learning least leave
    leaves leaving lect lecture lectures left legacy legal legend legends legion legisl length lens lent
    lesbian less lesser lesson lessons lett letters level levels lever levy liability liberal libert
    liberty libr libraries license licensed life lifestyle lift light lighting lightning lights like
    likewise limit limited limits line linear lines ling lingu link linked links lion liqu liquid list
    listen listening lists liter literacy literary lith lithium little live liver lives livestock living
    load loading loan local locate located location lock lodge logic logical login long longer look
    looking loop lord lords lore losing loss lost lots loud love lower loyal luck luke lunar lunch lung
    lymph mach machine machines macro made magazine magic magical magn magnesium magnet magnetic maid
    mail main maintain majesty major make maker makes making malaria male males mall malt mamm manage
    manager managers managing mand mang manifest manip manor mans mant manual manufact many maple
    mapping maps marc march marg marin marine maritime mark marker marketing markets marks marriage mars
    mart marvel mash mass massacre massage mast master mastering masters mastery match mate mater
    material materials maternal math mathemat maths matrix mats matt matter matters maxim maximum maybe
    mayor meal meals mean meaning means meanwhile meas measure measures measuring meat mechan mechanics
    mechanism medal media medic medical medicine medicines medieval medium meet meeting melan mell
    member members memoir memoirs memor memorial memory mend ment mental menu merc merchant mercury
    mercy merg mesh mess message messages messenger meta metabolic metadata metal metals meteor meth
    method methods metro mice micro microb middle might migration mild mile miles milit military milk
    mill millenn million millions mills mind minds mine mineral minerals mines mini minim minimal
    minimum mining minister ministers ministry minor minority mint minutes mira misc mish miss missile
    missing mission mist mixed mixing mobile mobility mock mode model modeling models moderate modern
    modified module moist moisture mold molecular moll moment mommy monarch monaster monastery monet
    monetary money monitor monkey monster mont month monthly monument mood moor moral more moreover
    morning morph mort mortality mosaic mosque mosquit mosquito most mostly mother mothers motion motor
    motors mount mountain mountains mouth move movement movements movie movies moving much mult multi
    multip multiple municip municipal muscle museums mush music musical must mutual myster mysteries
    mystery myth mythology myths name named names nano narc narr narrative narrow nation national
    nations native natives natural naturally nature naval navy near nearly nebula necess necessary neck
    need needed needs negative negot negro neigh neither neon neph nerv nerve nervous nest network
    networks neur neural neuro neurolog neurology neut neutral never news newsp newspaper next nice nick
    night nine ninth nitrogen noble nobody node noise none norm normal normally nort north northeast
    northern northwest notable notably note notes nothing notice novels nowadays nucle nuclear number
    numbers numerical numerous nurs nursery nurses nursing nutrient nutrients nutrition nuts obesity
    object objective objects observ observe observer obst obtain obviously occup occur oceanic oceans
    offer offering offic officer officers official officials often okay older omega once oncology ones
    ongoing online only open opening oper opera operating operation ophthalm opin opinion opportun
    optical optim optimal option optional options oracle oral orange orbit orbiter orch orche orchestra
    order orders ordinary organic organize orient orig origin original origins ornith orth orthodox
    oscill oste other others otherwise outcomes outdoor outer outline outlook output outreach outside
    over overall overview oxygen ozone pack package pact pagan page pages pain paint painting pair palae
    pale pall panc pand pandas pandemic panel pang panic pant papers parad paradise paradox paragraph
    parallel param parameter paras parent parental parenting parents parish parks pars parse part
    partial particip particle parties partition partner partners parts party pass passage passion
    passive password past paste patch patent path pathology patience patient patients patri patriarch
    patriot patrol pattern patterns payment peace peak pearl pedagog pediatric peer penal pend penguin
    peninsula penn penny pent people peoples perc percent pere perfect perform perhaps period periodic
    perm perman permanent pers perse person personal persons persu pest pestic petroleum pets pharaoh
    pharm pharmac pharmacy phase phen phenomen phil philos phon phone phot photo photos phyl phys
    physical physician physics phyt pick pict picture pictures pier pilgrim pilgrims pill ping pink pion
    pioneer pipe pipeline place placement places plain plains plan planetary planning plans plant
    planting plants plasma plastic plat plateau platform platforms play player players playing please
    plot plus plut pneum pocket poems poet poetry point points poison polar pole poles polic police
    policies policy polish polit political politics poll pollution poly polyn pond pont pool poor pope
    popular port portable portal portrait ports pose position positive poss possible possibly post
    postal posted posts potassium potential pour poverty powder power powerful powers pract practical
    practice practices prag pray prayer prec precision pred predict predictor pregn pregnancy pregnant
    prel prem premier premium prep prepar prepare prepared preparing pres preschool presence present
    preserve president press pressure pret pretty prev prevent previous price prices pride pries priest
    prim primary prime primitive prin princ prince princess princip principal principle print printable
    printed printer printing prior priority priv privacy private prize prob probably problem problems
    proc proced procedure process processes produ produce product products prof professor profile prog
    program programme programs progress project projects prolong prom promise promote promoting
    promotion prompt pron proof prop propag proper properly property prophe prophet prophets proposed
    pros prospect prosper prot prote protect protected protein proteins protest proto protocol protocols
    prov provide provider providers provides providing province prox pseud psych psychiat publ public
    published publisher pull pulmonary pulse pump pupils pupp purch purchase pure purple purpose purs
    push putting pyram pyramid python quad qual quality quant quantum quarter quarterly queens queer
    query quest question questions queue quick quiet quint quite quiz rabbi race racial racing racism
    radar radi radiation radical radio rail railroad railway raise raises raising ranch rand random
    range rank rapid rapp rare rash rate rates rather rating ratio rational reach reaction reactions
    read reader readers reading ready real realism reality really reason reasoning reasons rebell
    rebellion recall rece recent recently recipe recipes recogn recognize recomm recommend recon record
    recording records recovery rect recycling redist reduce reduced reducing reduction reed refer
    reference reflect reform reformed refrig refuge refugee refugees regarding regiment region regional
    regions register registry regular regularly rehab rein related relations relative relax rele release
    relevance relevant relief religion religions religious remedies remember remind remote removal
    remove removing renew renewable repair repeat repeated repet replace report reporting reports
    represent reprodu rept republic requ request required rescue research reserve reserved reservoir
    residents resonance resource resources resp respect respond respons response responses rest restaur
    result results retail retrieved return returning returns reve revenue reverse review reviews revised
    revision revival rhet rheumat rhythm rich rick ride ridge riding right rights rings rinse rise
    rising risk risks ritual rivers road roads robot robotics robots rock rocks rocky role roles roll
    rolling rolls roman romance romances romantic room root roots rough round rout route routine rover
    royal rule rules running runtime rural rush rust ruth sacrament sacred sadly safe safety sage said
    sail saint saints sale sales salmon salv salvation same sample samples sampling sanct sanctuary
    sands sandy sang sard satellite save saving savings says scal scale scales scan scar scenario scene
    sche sched schedule schema scheme schol scholar scholars schools science sciences scient scientist
    scope score scout scratch scre screen screening script scripture sculpt seab seaf seal search seas
    season seasonal second secondary secondly secret secretary secrets section sections sector secure
    security seeds seeing seek seeking select selected selecting selection self semi senate senator
    senators send senior sens sense sensing sensor sensors sensory sent sentence separate sept sequ
    sequence serial series serious serv serve server service services session sessions sets sett setting
    settings setup seven sevent seventh sever several severe sexual shack shadow shale sham shape shapes
    shaping shar share shared sharing sharp sheet sheets shel shell shepherd sher shift shin shipping
    ships shock shopping shore short shortly shot should show showing shows shut shuttle sick side siege
    sight sigma sign signal signs silence silent silicon silk similar similarly simpl simple simply
    since sing singer single sister sisters site sites sitting situ situation sixth size sketch skill
    skills skin skip slave slavery sleep sleeping slide slow slowly small smaller smart smile smoke
    smoking smooth snake snap soci social socialism socialist societies society sociology sodium soft
    software soil solar sold soldiers solid solution solutions solve solving some someone something
    sometimes song songs sons soon soph sore sort soul sound sounds source sources south southeast
    southern southwest sovere sovereign space spaces span spark spatial speak speaker speaking spec
    special species specific spect spectrum speech speed spelling spend spending spin spinal spir spirit
    spiritual split sport sports spot spray spread spring springs squad squadron square squir squirrel
    stability stack staff stage stages stain stake stam stand standard standards standing stark stars
    start started starting stat state statement states static statue status stay staying steam stem step
    steps ster stere stern stew stick still stim stir stock stones stop storage store stories story stra
    straight strain strange strat strateg strategic strategy straw stre stream street streets streng
    strength strept stress stri strict strike string strip stroke strong stru struct structure struggle
    stud student students studies studio study studying stuff style styles subject subjects submit
    subscribe subst substance success such sudden suddenly suff suggest suicide suitable suite sulf
    sultan summar summary summer summit sund sunshine super superior supp supplies supply support
    supports suppose supreme sure surely surface surg surgeon surgeons surgery surgical surreal surround
    surv surve survey surveys surviv survival susp sweet swift swimming switch syll symbol symbolism
    symbols symphony symposium symptoms syndrome synt syntax synthesis synthetic syst system systemic
    systems tables tact tags tail take taken takes taking tale tales talk talking tall tang tank tant
    tape target tart task tasks taste taxes teach teachers teaching team teams tech techn technical
    technique teen teens teeth tele telegraph telephone telescope tell temp temper templ template
    temporary tend tensor term terminal terms terra territ territory terror test testament testing tests
    text textbook texts than thank thanks that theatre their them theme themes then theology theore
    theorem theories theory ther therap therapy there therefore therm thermal these thesis they thin
    thing things think thinking thir third thirty this thor those thou though thought thoughts thousand
    thousands threat threats three through throw thus thyroid tick tier till timber time timeline times
    timing tiny tips tissue title tobacco today todd together token tolerance tomb tomorrow tong tool
    toolkit tools tooth topic topics torn tort total touch tour tourism tours toward towards town
    township toxic trace tracing track tracking tract trade trading tradition traffic trag tragedy trail
    training tran trans transc transfer transform transit transl transport trauma traumatic trav travel
    treasure treasury treat treating treatment treaty trees trek trends trial trials triangle trib
    tribal tribe tribes tribunal tric trich trig trim trip triple trium trop tropical trou trouble true
    trump trust truth trying tube tunnel tuple turb turkey turn turning turns tutor tutorial twelve
    twentieth twenty twin twist twitter type types typh typical typically ultimate ultra uncle under
    unicode unified uniform union unique unit united units unity univers universal universe unknown
    unless unlike unlocking until update updated updates upload upon upper urban usage used useful user
    users uses using usually util utilities utility utilize utilizing vacc vaccine vaccines value values
    vari variable variables variation various vascular vector vegan veget vegetable vehicle vehicles
    vent vera verb verbal verify vern vers verse version vert vertical very veter veterans vice vict
    victims victory video videos view views vill vine viol violence viral virgin virt virtual virus
    viruses visc vision visit visiting visitor visitors visual vital vitamin vitamins voice voices
    volcan volcano voltage volume volunt volunteer vote voting vulner wait wake walk walking walls want
    ward ware warfare warm warming warn warning wars wash waste watching water waters watershed watt
    watts wave waves ways weak wealth weapons wear wearing weather website websites weed week weekly
    weight welcome welfare well wellness wells were west western wetlands what whatever when whenever
    where whereas whether which while whilst whit white whites whole wick wide wiki wikipedia wild
    wildlife will william willow wills windows wine wing wins winter wire wireless wiring wisdom wise
    witch with within without witness witnesses wolf woman women wonder wonders woods wool word words
    work worker workers working workplace works workshe worksheet workshop world worlds worldwide worse
    worship worth would wouldn wrap writ write writer writers writing writings written wrong yang yard
    yeah year years yeast yellow yoga young younger your yours yourself youth zeal zero zinc zone zones
    zoom
""".split()
